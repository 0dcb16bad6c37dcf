"""Parallelism: the (data, fsdp, tensor) device mesh over slices, the logical-axis rules that
map onto it, TPU targets to compile for, and what a compiled program costs per device."""
