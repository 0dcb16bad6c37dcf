"""Runtime: what a running job sets up and records about itself: the persistent compilation
cache (compilation_cache), profiler traces of chosen steps (traces), the time account
(time_account)."""
