"""Model state: the PerceiverS of a config, its abstract parameters and their shardings.

Every user of parameters starts here: training (the Trainer's model), sampling (no optimizer is
built), export, parameter groups, and `state/run_dir.py`, which restores parameters from disk
into the abstract parameters built here.

  build(config, mesh)        the model of `config` laid out on `mesh` before any array exists
                             (nnx.eval_shape): its parameters as ShapeDtypeStructs carrying
                             their NamedShardings (logical-axis rules config.logical_axis_rules,
                             `parallel/partitioning`), the non-parameter state (RNG streams,
                             replicated), jitted creation straight into those shardings, and
                             `merge` (params + rest -> a model).

Parameters are a pure dict (the model's nnx.Param values), as in the training state.
"""

import dataclasses
import math
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections

from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.parallel import partitioning


def windows_are_left_padded(config: ml_collections.ConfigDict) -> bool:
  """Whether the input pipeline pads training/evaluation windows on the left
  (config.data.padding_side): the model's forwards over them then have slot masks."""
  return config.data.padding_side == "left"


def model_fn(config: ml_collections.ConfigDict, *, left_padded_windows: bool = False,
             backend: str | None = None) -> Callable[[], model_lib.PerceiverS]:
  """Builds the model of `config`, initialised from config.seed (`left_padded_windows`: its
  forwards only see the input pipeline's left-padded windows; `backend`: the platform it
  runs on; see `PerceiverS`)."""
  return lambda: model_lib.PerceiverS(config.model, rngs=nnx.Rngs(config.seed),
                                      left_padded_windows=left_padded_windows, backend=backend)


def split(model: model_lib.PerceiverS) -> tuple[Any, nnx.State]:
  """(parameters as a pure dict, the non-parameter state: RNG streams) of `model`."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.to_pure_dict(params), rest


def param_shapes(model_config: ml_collections.ConfigDict) -> Any:
  """ShapeDtypeStructs of the parameters `model_config` builds (nothing allocated, no mesh)."""
  model = nnx.eval_shape(lambda: model_lib.PerceiverS(model_config, rngs=nnx.Rngs(0)))
  return split(model)[0]


def count_params(params: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True)
class ModelState:
  """The model of `config` on `mesh`, before any array exists (from `build`)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  graphdef: nnx.GraphDef
  param_template: nnx.State  # the abstract nnx.Param state that `merge` fills in.
  abstract_params: Any  # pure dict of ShapeDtypeStructs carrying the target shardings.
  abstract_rest: nnx.State  # RNG streams as ShapeDtypeStructs, replicated.
  param_shardings: Any
  rest_shardings: nnx.State
  init: Callable[[], tuple[Any, nnx.State]]  # jitted: config.seed's (params, rest), sharded.
  init_rest: Callable[[], nnx.State]  # jitted: the RNG streams alone.

  @property
  def num_params(self) -> int:
    return count_params(self.abstract_params)

  def abstract_params_in(self, dtype: str) -> Any:
    """`abstract_params` with every parameter in `dtype` (e.g. an export's)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype),
                                                       sharding=a.sharding), self.abstract_params)

  def merge(self, params: Any, rest: nnx.State) -> model_lib.PerceiverS:
    """The model holding `params` (a pure dict) and `rest`; also inside jit."""
    param_state = jax.tree.map(lambda x: x, self.param_template)  # fresh Variables to fill in.
    nnx.replace_by_pure_dict(param_state, params)
    # Fresh Variables at the current trace level (NNX refuses ones created under another trace).
    return nnx.merge(self.graphdef, param_state, jax.tree.map(lambda x: x, rest))


def build(config: ml_collections.ConfigDict, mesh: Mesh, *,
          left_padded_windows: bool = False) -> ModelState:
  """The model of `config` laid out on `mesh` (rules: config.logical_axis_rules), its
  kernels chosen for the platform of the mesh's devices; `left_padded_windows` as in
  `model_fn`."""
  create = model_fn(config, left_padded_windows=left_padded_windows,
                    backend=mesh_lib.platform(mesh))
  graphdef, param_template, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
  param_shardings = nnx.to_pure_dict(
      partitioning.state_shardings(param_template, mesh, tuple(config.logical_axis_rules)))
  replicated = NamedSharding(mesh, PartitionSpec())
  rest_shardings = jax.tree.map(lambda _: replicated, rest)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return ModelState(
      config=config, mesh=mesh, graphdef=graphdef, param_template=param_template,
      abstract_params=jax.tree.map(with_sharding, nnx.to_pure_dict(param_template),
                                   param_shardings),
      abstract_rest=jax.tree.map(with_sharding, rest, rest_shardings),
      param_shardings=param_shardings, rest_shardings=rest_shardings,
      init=jax.jit(lambda: split(create()), out_shardings=(param_shardings, rest_shardings)),
      init_rest=jax.jit(lambda: split(create())[1], out_shardings=rest_shardings))


def build_local(config: ml_collections.ConfigDict) -> ModelState:
  """`build` on a data-only mesh over every device (parameters replicated)."""
  return build(config, mesh_lib.data_mesh())
