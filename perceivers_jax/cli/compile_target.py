"""The flags of a dry run compiled for hardware this host is not: --compile_topology (a TPU
slice, BUILD.md section 10, or a GPU node, section 5) and --compile_topology_num_slices.
Shared by perceivers-train and perceivers-sample."""

from absl import flags

from perceivers_jax.parallel import topology

COMPILE_TOPOLOGY = flags.DEFINE_string(
    "compile_topology", None, "With --dry_run: compile for this TPU slice or GPU node instead "
    "of this host's devices (v4-8, v5e-16, v5p-32, v6e-8, ... with libtpu: pip install -e "
    "'.[tpu]', BUILD.md section 10; h100-8, h200-16 with jax's CUDA plugin, section 5).")
NUM_SLICES = flags.DEFINE_integer(
    "compile_topology_num_slices", 1, "With --compile_topology: that many slices (the mesh's "
    "config.mesh.dcn_* level spans them).")


def requested() -> bool:
  """Was a target given? Then jax is kept on the CPU backend (`topology.quiet_libtpu`): call
  it before anything touches a jax backend."""
  if COMPILE_TOPOLOGY.value:
    topology.quiet_libtpu()
  return bool(COMPILE_TOPOLOGY.value)
