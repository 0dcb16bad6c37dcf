"""Logical axis names -> mesh axes (config.logical_axis_rules), for parameters and activations.

Layers name axes logically (batch, length, latents, embed, heads, kv, mlp, vocab, layers) and
never mention a mesh axis. Parameters carry their names as `out_sharding` metadata (created
with `eager_sharding=False`, so building a model needs no mesh); `state_shardings` turns an
(abstract) model state into NamedShardings for `jax.jit(..., out_shardings=...)`, and
`constrain` pins activations while `activation_sharding(mesh, rules)` is active (a no-op
otherwise, so the model runs unchanged on one device).

A dimension whose size does not divide the mesh axes it maps to (e.g. the 391-way vocabulary
on a tensor axis of 2) is replicated instead of failing.
"""

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import flax.core.spmd
from flax import nnx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, Any]]

BATCH_AXES = ("data", "fsdp")  # the mesh axes a global batch's rows are split over.


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a [B, L] batch array: rows over BATCH_AXES, positions whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def logical_param(init: Callable[..., jax.Array], axes: LogicalAxes) -> Callable[..., jax.Array]:
  """An initializer whose Param carries logical axis names (no mesh needed at creation)."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def _mesh_axes_of(name: str | None, rules: Rules) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, physical in rules:
    if logical == name:
      if physical is None:
        return ()
      return (physical,) if isinstance(physical, str) else tuple(physical)
  raise ValueError(f"Logical axis {name!r} has no entry in config.logical_axis_rules "
                   f"({[r[0] for r in rules]}); add one (None = replicated).")


def logical_to_mesh_spec(axes: LogicalAxes, rules: Rules, mesh_shape: dict[str, int],
                         shape: Sequence[int] | None = None) -> PartitionSpec:
  """PartitionSpec for an array with logical `axes` on a mesh of `mesh_shape`.

  A mesh axis is used at most once (first logical axis wins) and only where it divides the
  dimension (when `shape` is given); mesh axes of size 1 are dropped.
  """
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(axes):
    chosen = []
    size = 1
    for axis in _mesh_axes_of(name, rules):
      if axis in used or mesh_shape.get(axis, 1) == 1:
        continue
      if axis not in mesh_shape:
        raise ValueError(f"Rule for logical axis {name!r} names mesh axis {axis!r}, not in the "
                         f"mesh {dict(mesh_shape)}; fix config.logical_axis_rules.")
      if shape is not None and shape[dim] % (size * mesh_shape[axis]):
        continue
      chosen.append(axis)
      size *= mesh_shape[axis]
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def _variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
  axes = var.get_metadata().get("out_sharding") or ()
  shape = var.get_value().shape
  if axes and len(axes) != len(shape):
    raise ValueError(f"Parameter of shape {shape} has logical axes {axes} (rank mismatch).")
  return NamedSharding(mesh, logical_to_mesh_spec(axes, rules, dict(mesh.shape), shape))


def state_shardings(model_or_state: Any, mesh: Mesh, rules: Rules) -> nnx.State:
  """NamedShardings of every Variable of a model or (abstract) state, same tree structure.

  Variables without logical names (RNG keys and counts) are replicated.
  """
  state = (nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return jax.tree.map(lambda v: v.replace(_variable_sharding(v, mesh, rules)), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(model_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
  """Builds `model_fn()` directly sharded over `mesh`, never materialised on one device."""
  abstract = nnx.eval_shape(model_fn)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.state(model_fn())

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates `mesh` and `rules` for `constrain` (enter it around tracing the step)."""
  with jax.set_mesh(mesh), flax.core.spmd.logical_axis_rules(tuple(rules)):
    yield


@dataclasses.dataclass(frozen=True)
class InMesh:
  """A jitted function called (and lowered) with the mesh and logical-axis rules active, as
  `constrain` needs while jax traces."""
  fn: Any
  mesh: Mesh
  rules: tuple

  def __call__(self, *args):
    with activation_sharding(self.mesh, self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with activation_sharding(self.mesh, self.rules):
      return self.fn.lower(*args)


def per_shard(fn: Callable[..., jax.Array], args: Sequence[jax.Array],
              axes: Sequence[LogicalAxes]) -> jax.Array:
  """fn(*args) run on each device's shards, for kernels XLA cannot partition (Mosaic ones,
  which jax refuses to partition; cuDNN's).

  Inside `activation_sharding`, a `jax.shard_map` over its mesh: argument i is split along
  the mesh axes its logical `axes[i]` map to under the active rules (where they divide it),
  and the result is sharded like args[0]. Without an active mesh and rules (a program that
  is not partitioned) fn itself runs.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = flax.core.spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return fn(*args)
  specs = tuple(logical_to_mesh_spec(a, rules, dict(mesh.shape), x.shape)
                for a, x in zip(axes, args))
  return jax.shard_map(fn, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Sharding constraint from logical axes; a no-op without an active mesh and rules."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = flax.core.spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"Logical axes {tuple(axes)} do not match an activation of shape {x.shape}.")
  spec = logical_to_mesh_spec(axes, rules, dict(mesh.shape), x.shape)
  return jax.lax.with_sharding_constraint(x, spec)
