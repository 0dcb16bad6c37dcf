"""Multi-head attention: projections with rotary encoding, and four attention kernels.

`Attention` exposes its steps separately (`project_query`, `project_key_value`, `attend`) so
the cached decoder reuses the same projections and kernels as training: it projects keys and
values once, stores them, and attends new queries against the stored ones.

Kernels (`KERNELS`):
  xla:     einsum + masked softmax; any backend.
  cudnn:   `jax.nn.dot_product_attention(..., implementation="cudnn")` with a dense boolean
           mask (never `is_causal`, which aligns top-left); GPU and bf16/fp16 only.
  chunked: lax.scan over key chunks with an online softmax, so memory grows with the chunk,
           not with L; for long contexts on CPU/TPU.
  splash:  the TPU Pallas kernel (`splash.py`) with slot masks: exact only for the model's
           forward over left-padded windows (`CALLS`); off a TPU it runs in Pallas interpret
           mode, a slow path for tests only.
config.model.attention_impl names one of them or `auto`. The kernel is a runtime choice, not
a property of the parameters: `resolve_impl` picks it per layer and per call (a window
forward, a decoder reset over the caches, or a decoder step of one query) when the model is built, for the backend it runs on, so a
model trained with `cudnn` or `splash` restores, samples and fine-tunes on any backend (with
a log line saying what runs instead). The backend is the one the model is built for (a TPU
topology compiled for on a CPU host gets TPU kernels), and `auto` never picks a kernel whose
documented limits the call breaks (`cudnn_fits`, `splash.fits`). Splash and cuDNN run once
per device on its shard of rows (`partitioning.per_shard`): jax cannot partition a Mosaic
kernel, and cuDNN's shapes are then the per-device ones.
Queries that see no key (padding latents) get zeros, never NaN.
"""

from absl import logging
import jax
import jax.numpy as jnp
from flax import nnx

from perceivers_jax.model import masks as masks_lib
from perceivers_jax.model import rotary
from perceivers_jax.model import splash
from perceivers_jax.parallel import partitioning

KERNELS = ("xla", "cudnn", "chunked", "splash")
ATTENTION_IMPLS = ("auto",) + KERNELS
# window: the model's forward over left-padded windows of contiguous positions, whose masks
# are slot masks (`splash.py`): splash can run. cached: the decoder's reset calls (F queries)
# over ring-buffer caches, and windows that are not left-padded or whose mask is no slot
# mask: never splash. step: the decoder's plain step, one new latent's query per row.
CALLS = ("window", "cached", "step")
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Key lengths every kernel accepts: whole splash blocks, which are even (cuDNN's training
# rule). A windowed short scale's keys are padded to them (`perceivers.cross_key_lengths`).
KEY_BLOCK = splash.BLOCK
# Finite stand-in for -inf, so fully masked rows stay finite in float32.
_NEG = -1e30


def _cudnn_max_head_dim() -> int:
  """jax's cuDNN limit on the head dim: 256 from Hopper (compute capability 9.0) on, 128
  before, and 128 where no GPU is visible (a target compiled for elsewhere)."""
  try:
    capability = jax.devices("gpu")[0].compute_capability
  except RuntimeError:
    return 128
  return 256 if tuple(int(x) for x in capability.split(".")) >= (9, 0) else 128


def cudnn_fits(*, dtype, head_dim: int, num_queries: int, kv_length: int, call: str) -> bool:
  """Does jax's cuDNN attention accept this call (its check_is_flash_attention, in
  jax/_src/cudnn/fused_attention_stablehlo.py)? bfloat16/float16; a head dim that is a
  multiple of 8 and at most `_cudnn_max_head_dim()`; and in training with a mask (the
  gradient of a window call: the mask is passed as a bias) even query and key lengths."""
  if jnp.dtype(dtype) not in _HALF_DTYPES:
    return False
  if head_dim % 8 or head_dim > _cudnn_max_head_dim():
    return False
  return call != "window" or (num_queries % 2 == 0 and kv_length % 2 == 0)


def auto_impl(*, backend: str, dtype, kv_length: int, chunk_size: int, call: str = "cached",
              num_queries: int = 0, head_dim: int) -> str:
  """`auto`: plain XLA for a decoder step; cuDNN on GPU where it accepts the call
  (`cudnn_fits`); splash on TPU for window calls whose `num_queries` fill its blocks
  (`splash.fits`); elsewhere the chunked kernel once the keys outnumber one chunk (its memory
  grows with the chunk, not the keys) and plain XLA below that.

  A step's scores are one row per head, so a fused or chunked kernel has no memory to save,
  and XLA's two einsums read the caches where they lie: the chunked kernel's padding and
  reshape, or cuDNN's [B, T, H, K] layout, would copy every cache each token."""
  if call == "step":
    return "xla"
  if backend == "gpu" and cudnn_fits(dtype=dtype, head_dim=head_dim, num_queries=num_queries,
                                     kv_length=kv_length, call=call):
    return "cudnn"
  if backend == "tpu" and call == "window" and splash.fits(num_queries):
    return "splash"
  return "chunked" if kv_length > chunk_size else "xla"


def resolve_impl(requested: str, *, backend: str, dtype, kv_length: int, chunk_size: int,
                 call: str = "cached", num_queries: int = 0, head_dim: int) -> str:
  """The kernel a `call` (`CALLS`) of a layer with `num_queries` queries of `head_dim` over
  `kv_length` keys runs on `backend`, the platform the model is built for (a mesh's devices:
  a TPU topology compiled for on a CPU host is `tpu`).

  `requested` (config.model.attention_impl) is used when it can run there; `auto`, or a
  kernel that cannot run there (cudnn off a GPU or where `cudnn_fits` refuses the call;
  splash outside a window call or with queries that do not fill its blocks), gives
  `auto_impl`'s choice. This is the one place a kernel is chosen.
  """
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl={requested!r}; use one of {ATTENTION_IMPLS}.")
  if call not in CALLS:
    raise ValueError(f"attention call {call!r}; use one of {CALLS}.")
  choice = auto_impl(backend=backend, dtype=dtype, kv_length=kv_length, chunk_size=chunk_size,
                     call=call, num_queries=num_queries, head_dim=head_dim)
  if requested == "auto":
    return choice
  if requested == "cudnn" and backend != "gpu":
    logging.warning("config.model.attention_impl='cudnn' cannot run on %s (it needs an NVIDIA "
                    "GPU): using %r for %d keys.", backend, choice, kv_length)
    return choice
  if requested == "cudnn" and not cudnn_fits(dtype=dtype, head_dim=head_dim,
                                             num_queries=num_queries, kv_length=kv_length,
                                             call=call):
    logging.warning("config.model.attention_impl='cudnn' refuses %d queries over %d keys of "
                    "head dim %d in %s (it needs bfloat16/float16, a head dim that is a "
                    "multiple of 8 up to %d, even lengths in training): using %r.",
                    num_queries, kv_length, head_dim, jnp.dtype(dtype).name,
                    _cudnn_max_head_dim(), choice)
    return choice
  if requested == "splash" and call != "window":
    return choice
  if requested == "splash" and not splash.fits(num_queries):
    logging.warning("config.model.attention_impl='splash' needs a multiple of %d queries "
                    "(got %d): using %r for %d keys.", splash.BLOCK, num_queries, choice,
                    kv_length)
    return choice
  return requested


def _xla_attention(q_BNHK, k_BLHK, v_BLHK, mask: masks_lib.Mask) -> jax.Array:
  visible_BN1L = mask.dense()[:, :, None, :]
  s_BNHL = jnp.einsum("bnhk,blhk->bnhl", q_BNHK, k_BLHK, preferred_element_type=jnp.float32)
  s_BNHL = jnp.where(visible_BN1L, s_BNHL, _NEG)
  max_BNH = jax.lax.stop_gradient(s_BNHL.max(axis=-1))
  p_BNHL = jnp.where(visible_BN1L, jnp.exp(s_BNHL - max_BNH[..., None]), 0.0)
  denom_BNH = p_BNHL.sum(axis=-1)
  out_BNHK = jnp.einsum("bnhl,blhk->bnhk", p_BNHL.astype(v_BLHK.dtype), v_BLHK,
                        preferred_element_type=jnp.float32)
  return out_BNHK / jnp.maximum(denom_BNH, 1e-30)[..., None]


def _chunked_attention(q_BNHK, kv_inputs, mask: masks_lib.Mask, chunk_size: int,
                       keys_values_of=lambda k, v: (k, v)):
  """Online softmax over key chunks. `kv_inputs` are [B, L, ...] arrays cut into chunks with
  the mask; `keys_values_of(*chunks)` gives a chunk's keys and values ([B, chunk, H, K]):
  the keys/values themselves, or their projection from the chunk's inputs, so that the
  whole [B, L, H, K] keys never exist (nor, in the backward pass, their gradients)."""
  batch, length = mask.kv_positions_BL.shape
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length

  def chunks(a):  # [B, L, ...] -> [num_chunks, B, chunk, ...]; padded keys are invalid.
    a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    return jnp.moveaxis(a.reshape((batch, num_chunks, chunk) + a.shape[2:]), 1, 0)

  xs = (tuple(chunks(a) for a in kv_inputs), chunks(mask.kv_positions_BL),
        chunks(mask.kv_valid_BL))
  num_q, heads = q_BNHK.shape[1], q_BNHK.shape[2]

  # Rematerialised per chunk: the backward pass keeps only the carries, not [N, chunk] scores.
  @jax.checkpoint
  def step(carry, x):
    max_BNH, denom_BNH, acc_BNHK = carry
    inputs_c, pos_c, valid_c = x
    k_c, v_c = keys_values_of(*inputs_c)
    chunk_mask = masks_lib.Mask(mask.q_positions_BN, mask.q_lower_BN, pos_c, valid_c)
    visible_BN1C = chunk_mask.dense()[:, :, None, :]
    s_BNHC = jnp.einsum("bnhk,bchk->bnhc", q_BNHK, k_c, preferred_element_type=jnp.float32)
    s_BNHC = jnp.where(visible_BN1C, s_BNHC, _NEG)
    new_max = jax.lax.stop_gradient(jnp.maximum(max_BNH, s_BNHC.max(axis=-1)))
    correction = jnp.exp(max_BNH - new_max)
    p_BNHC = jnp.where(visible_BN1C, jnp.exp(s_BNHC - new_max[..., None]), 0.0)
    denom_BNH = denom_BNH * correction + p_BNHC.sum(axis=-1)
    acc_BNHK = acc_BNHK * correction[..., None] + jnp.einsum(
        "bnhc,bchk->bnhk", p_BNHC.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32)
    return (new_max, denom_BNH, acc_BNHK), None

  value_dim = jax.eval_shape(keys_values_of, *(
      jax.ShapeDtypeStruct((batch, chunk) + a.shape[2:], a.dtype) for a in kv_inputs))[1]
  init = (jnp.full((batch, num_q, heads), _NEG, jnp.float32),
          jnp.zeros((batch, num_q, heads), jnp.float32),
          jnp.zeros((batch, num_q, heads, value_dim.shape[-1]), jnp.float32))
  (_, denom_BNH, acc_BNHK), _ = jax.lax.scan(step, init, xs)
  return acc_BNHK / jnp.maximum(denom_BNH, 1e-30)[..., None]


def _cudnn_attention(q_BNHK, k_BLHK, v_BLHK, mask: masks_lib.Mask) -> jax.Array:
  visible_BNL = mask.dense()
  any_BN = visible_BNL.any(axis=-1)
  # cuDNN's softmax over an empty row is undefined: give such rows key 0, then zero them.
  first_key_L = jnp.arange(visible_BNL.shape[-1]) == 0
  visible_BNL = visible_BNL | (~any_BN[:, :, None] & first_key_L)
  out_BNHK = jax.nn.dot_product_attention(q_BNHK, k_BLHK, v_BLHK, mask=visible_BNL[:, None],
                                          scale=1.0, implementation="cudnn")
  return jnp.where(any_BN[:, :, None, None], out_BNHK, 0)


# The logical axes of a kernel's arguments: rows and heads may be split over devices, the
# query and key lengths never (a kernel sees whole windows).
_Q_AXES = ("batch", None, "heads", None)
_Q_VALID_AXES = ("batch", None)


def dot_product_attention(q_BNHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
                          mask: masks_lib.Mask, *, impl: str = "xla", chunk_size: int = 4096,
                          splash_scale: int = 0, backend: str | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(K)) v over the keys `mask` lets each query see; dtype of v out.

  `splash` reads only the padding from `mask`: its slots are a left-padded window's, and
  `splash_scale` is the sliding scale (0: causal; see `splash.splash_mask`). It runs in
  Pallas interpret mode unless `backend` (where the program runs; default
  jax.default_backend()) is a TPU. Splash and cuDNN run once per device on its rows (and
  heads, when tensor-parallel): `partitioning.per_shard`.
  """
  q_BNHK = q_BNHK * jnp.asarray(q_BNHK.shape[-1] ** -0.5, q_BNHK.dtype)
  if impl == "xla":
    out = _xla_attention(q_BNHK, k_BLHK, v_BLHK, mask)
  elif impl == "chunked":
    out = _chunked_attention(q_BNHK, (k_BLHK, v_BLHK), mask, chunk_size)
  elif impl == "cudnn":
    out = partitioning.per_shard(
        lambda q, k, v, *positions: _cudnn_attention(q, k, v, masks_lib.Mask(*positions)),
        (q_BNHK, k_BLHK, v_BLHK, mask.q_positions_BN, mask.q_lower_BN, mask.kv_positions_BL,
         mask.kv_valid_BL), (_Q_AXES,) * 3 + (_Q_VALID_AXES,) * 4)
  elif impl == "splash":
    interpret = (backend or jax.default_backend()) != "tpu"
    out = partitioning.per_shard(
        lambda q, k, v, q_valid, kv_valid: splash.splash_attention(
            q, k, v, q_valid, kv_valid, scale=splash_scale, interpret=interpret),
        (q_BNHK, k_BLHK, v_BLHK, mask.q_positions_BN >= 0, mask.kv_valid_BL),
        (_Q_AXES,) * 3 + (_Q_VALID_AXES,) * 2)
  else:
    raise ValueError(f"attention kernel {impl!r}; use one of {KERNELS} (resolve_impl picks one).")
  return out.astype(v_BLHK.dtype)


class Attention(nnx.Module):
  """Multi-head attention with rotary q/k; projections and kernel usable separately.

  `impl`, `step_impl` and `window_impl` are kernels of `KERNELS` (already resolved for
  `backend`, the platform the model runs on, see `resolve_impl`) for cached calls, for cached
  calls of one query (a decoder step) and for window calls (`window=True`, `attend_inputs`);
  `window_scale` is the layer's sliding scale (0: causal), which only splash reads.
  """

  def __init__(self, q_dim: int, kv_dim: int, *, num_heads: int, head_dim: int,
               rotary_fraction: float, max_wavelength: float, impl: str, step_impl: str,
               window_impl: str, window_scale: int, chunk_size: int, backend: str, dtype,
               param_dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal
    proj_init = partitioning.logical_param(init(in_axis=0, out_axis=(1, 2)),
                                           ("embed", "heads", "kv"))
    bias_init = partitioning.logical_param(nnx.initializers.zeros, ("heads", "kv"))

    def param(init_fn, shape):
      return nnx.Param(init_fn(rngs.params(), shape, param_dtype))

    self.query_kernel = param(proj_init, (q_dim, num_heads, head_dim))
    self.query_bias = param(bias_init, (num_heads, head_dim))
    self.key_kernel = param(proj_init, (kv_dim, num_heads, head_dim))
    self.key_bias = param(bias_init, (num_heads, head_dim))
    self.value_kernel = param(proj_init, (kv_dim, num_heads, head_dim))
    self.value_bias = param(bias_init, (num_heads, head_dim))
    self.out_kernel = param(partitioning.logical_param(init(in_axis=(0, 1), out_axis=2),
                                                       ("heads", "kv", "embed")),
                            (num_heads, head_dim, q_dim))
    self.out_bias = param(partitioning.logical_param(nnx.initializers.zeros, ("embed",)),
                          (q_dim,))
    self.rotary_fraction = rotary_fraction
    self.max_wavelength = max_wavelength
    self.impl = impl
    self.step_impl = step_impl
    self.window_impl = window_impl
    self.window_scale = window_scale
    self.chunk_size = chunk_size
    self.backend = backend
    self.dtype = dtype

  def _project(self, x_BTD, kernel, bias, positions_BT, length_axis, rotate):
    y_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD.astype(self.dtype),
                        kernel.get_value().astype(self.dtype))
    y_BTHK = y_BTHK + bias.get_value().astype(self.dtype)
    if rotate:
      y_BTHK = rotary.apply_rotary(y_BTHK, positions_BT, fraction=self.rotary_fraction,
                                   max_wavelength=self.max_wavelength)
    return partitioning.constrain(y_BTHK, ("batch", length_axis, "heads", "kv"))

  def project_query(self, x_BND: jax.Array, positions_BN: jax.Array) -> jax.Array:
    """Rotated queries [B, N, H, K]."""
    return self._project(x_BND, self.query_kernel, self.query_bias, positions_BN, "latents",
                         True)

  def project_key_value(self, x_BLD: jax.Array, positions_BL: jax.Array, *,
                        length_axis: str = "length") -> tuple[jax.Array, jax.Array]:
    """Rotated keys and values [B, L, H, K] (what a decoding cache stores)."""
    k = self._project(x_BLD, self.key_kernel, self.key_bias, positions_BL, length_axis, True)
    v = self._project(x_BLD, self.value_kernel, self.value_bias, positions_BL, length_axis,
                      False)
    return k, v

  def attend(self, q_BNHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
             mask: masks_lib.Mask, *, window: bool = False) -> jax.Array:
    """Attention over (possibly cached) keys/values, then the output projection: [B, N, D].

    `window`: a call of the model's forward over a window (`window_impl`), not a cached one
    (`step_impl` for one query, `impl` for more).
    """
    if window:
      impl = self.window_impl
    else:
      impl = self.step_impl if q_BNHK.shape[1] == 1 else self.impl
    out_BNHK = dot_product_attention(q_BNHK, k_BLHK, v_BLHK, mask, impl=impl,
                                     chunk_size=self.chunk_size, splash_scale=self.window_scale,
                                     backend=self.backend)
    return self._output(out_BNHK)

  def attend_inputs(self, q_BNHK: jax.Array, x_BLD: jax.Array, positions_BL: jax.Array,
                    mask: masks_lib.Mask, *, norm=lambda x: x) -> jax.Array:
    """A window call of `attend` over the keys/values of inputs `norm(x)` (= attend(q,
    *project_key_value(norm(x)), window=True)).

    The chunked kernel normalises and projects the inputs one chunk at a time inside its
    loop, so neither norm(x) nor the [B, L, H, K] keys and values (nor their gradients) exist
    whole: that is most of the training memory of a long cross-attention layer.
    """
    if self.window_impl != "chunked":
      return self.attend(q_BNHK, *self.project_key_value(norm(x_BLD), positions_BL), mask,
                         window=True)
    q_BNHK = q_BNHK * jnp.asarray(q_BNHK.shape[-1] ** -0.5, q_BNHK.dtype)
    out_BNHK = _chunked_attention(q_BNHK, (x_BLD, positions_BL), mask, self.chunk_size,
                                  lambda x, p: self.project_key_value(norm(x), p))
    return self._output(out_BNHK.astype(self.dtype))

  def _output(self, out_BNHK: jax.Array) -> jax.Array:
    out_BND = jnp.einsum("bnhk,hkd->bnd", out_BNHK, self.out_kernel.get_value().astype(self.dtype))
    out_BND = out_BND + self.out_bias.get_value().astype(self.dtype)
    return partitioning.constrain(out_BND, ("batch", "latents", "embed"))
