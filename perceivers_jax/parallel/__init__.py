"""Parallelism: the (data, fsdp, tensor) device mesh and the logical-axis rules that map onto it."""
