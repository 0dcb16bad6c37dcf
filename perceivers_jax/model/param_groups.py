"""Flat names and groups of the model's parameters (export names, fine-tuning freeze groups).

The parameters are a nested dict (the model's nnx.Param values as a pure dict, as in the
training state). A leaf's flat name joins its keys with "." (list indices as numbers), e.g.

  embed.embedding                         [V, D]
  latent_init.kernel / .bias              [D, D] / [D]
  cross_layers.0.attention.query_kernel   [D, H, K]   one cross layer per attention scale
  cross_layers.0.mlp.wi.kernel            [D, F]
  latent_layers.attention.query_kernel    [S, D, H, K]
  final_norm.scale                        [D]
  head.kernel / head.bias                 [D, V] / [V]

With config.model.scan_layers=True (the default) `latent_layers.*` arrays hold all S latent
layers on a leading `layers` axis; with scan_layers=False they are `latent_layers.0.*`, ...

A *group* is a dotted prefix of whole name components. The top-level groups are GROUPS; finer
ones work too ("cross_layers.1", "latent_layers.mlp", "head.kernel"). A single scanned latent
layer is not a group (it is a slice of each array).
"""

from typing import Any, Iterable, Sequence

import jax

GROUPS = ("embed", "latent_init", "cross_layers", "latent_layers", "final_norm", "head")


def _key_name(entry: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  raise TypeError(f"Unexpected parameter tree key {entry!r}.")


def flat_name(path: Sequence[Any]) -> str:
  """The dotted name of a jax tree path, e.g. "cross_layers.0.attention.query_kernel"."""
  return ".".join(_key_name(entry) for entry in path)


def flatten(params: Any) -> dict[str, Any]:
  """{flat name: leaf} of a params tree, in tree order."""
  return {flat_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def map_with_names(fn, params: Any) -> Any:
  """`params` with each leaf replaced by fn(flat_name, leaf)."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(flat_name(path), leaf), params)


def in_group(name: str, group: str) -> bool:
  return name == group or name.startswith(group + ".")


def unknown_groups(names: Iterable[str], groups: Sequence[str]) -> list[str]:
  """The entries of `groups` that match no parameter name."""
  names = list(names)
  return [g for g in groups if not any(in_group(n, g) for n in names)]


def frozen_mask(params: Any, groups: Sequence[str]) -> Any:
  """A tree of bools like `params`: True where the parameter belongs to one of `groups`."""
  return map_with_names(lambda name, _: any(in_group(name, g) for g in groups), params)
