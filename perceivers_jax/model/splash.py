"""Splash attention (the TPU Pallas kernel) for the model's attention patterns.

Splash masks are by slot, not by position, so they equal the position masks of `masks.py`
only where slots and positions line up: windows of contiguous positions, left-padded, with
the queries the last N slots of the keys (the training windows; a windowed sliding scale's
key window also ends at the latent block's end, `masks.slice_sliding_window`). There
  cross-attention:  CausalMask((N, T), offset=T-N); a sliding scale W instead
                    LocalMask((N, T), window_size=(W-1, 0), offset=T-N);
  latent self-attention: CausalMask((N, N));
  padding:          SegmentIds (1 valid, 0 padding), so a padding query (segment 0) sees
                    padding keys only and its output is then zeroed, as the other kernels.
Splash does not scale q: `attention.dot_product_attention` scales it before any kernel.
The cached decoder's ring-buffer caches have no such slot structure: it needs another kernel
(`attention.resolve_impl` never gives splash to a cached call).
Splash works in blocks of `BLOCK` (a multiple of the TPU's 128 lanes, also in interpret mode):
N must be a multiple of it (`fits`), and the keys are left-padded up to one with padding keys.
`interpret=True` runs the kernel on CPU in Pallas interpret mode (how the tests check it).
`splash_attention` sees one device's rows: jax refuses to partition a Mosaic kernel, so
`attention.dot_product_attention` calls it inside a shard_map (`partitioning.per_shard`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib

BLOCK = 128


def fits(num_queries: int) -> bool:
  """Can splash run a layer with `num_queries` queries (whole blocks of them)?"""
  return num_queries > 0 and num_queries % BLOCK == 0


def splash_mask(num_q: int, num_kv: int, num_heads: int, *,
                scale: int = 0) -> mask_lib.MultiHeadMask:
  """The slot mask of queries that are the last `num_q` of `num_kv` keys: causal, or sliding
  over the last `scale` slots (scale 0: full context)."""
  shape, offset = (num_q, num_kv), num_kv - num_q
  if scale:
    head = mask_lib.LocalMask(shape, window_size=(scale - 1, 0), offset=offset)
  else:
    head = mask_lib.CausalMask(shape, offset=offset)
  return mask_lib.MultiHeadMask([head] * num_heads)


@functools.lru_cache(maxsize=32)
def _kernel(num_q: int, num_kv: int, num_heads: int, scale: int, block: int, interpret: bool):
  """The splash kernel of `splash_mask`, its mask's block tables held as numpy arrays.

  `make_splash_mha` turns the tables into jax arrays, which places them on a device: inside
  a trace for a TPU topology (no such device here) that fails, and a traced first call would
  leave tracers in this cache. The tables are built here, as jax's constructor builds them,
  with numpy only: constants of whichever program calls the kernel.
  """
  sizes = kernel_lib.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash_mask(num_q, num_kv, num_heads, scale=scale)
  tables = dict(head_shards=1, q_seq_shards=1)
  # The dq pass uses the forward's blocks, hence its tables.
  fwd_info, mask_function = mask_info_lib.process_mask(mask, (block, block), **tables)
  dkv_info, _ = mask_info_lib.process_mask_dkv(mask, (block, block), shrink_grid=True, **tables)
  return kernel_lib.SplashAttentionKernel(
      fwd_info, fwd_info, dkv_info, block_sizes=sizes, is_mqa=False, save_residuals=False,
      mask_value=kernel_lib.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
      residual_checkpoint_name=None, mask_function=mask_function, interpret=interpret)


def splash_attention(q_BNHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array,
                     q_valid_BN: jax.Array, kv_valid_BT: jax.Array, *, scale: int = 0,
                     interpret: bool = False) -> jax.Array:
  """softmax(q k^T) v over `splash_mask` and the padding, [B, N, H, K] in v's dtype.

  q is used as given (already scaled). N must be a multiple of `BLOCK` (`fits`); T is
  left-padded to one (padding keys: what a left-padded window has in front anyway).
  """
  if not fits(q_BNHK.shape[1]):
    raise ValueError(f"splash attention needs a multiple of {BLOCK} queries, got "
                     f"{q_BNHK.shape[1]} (config.model.num_latents).")
  pad = -k_BTHK.shape[1] % BLOCK
  left = lambda x: jnp.pad(x, ((0, 0), (pad, 0)) + ((0, 0),) * (x.ndim - 2))
  k_BTHK, v_BTHK, kv_valid_BT = left(k_BTHK), left(v_BTHK), left(kv_valid_BT)
  num_q, num_kv, num_heads = q_BNHK.shape[1], k_BTHK.shape[1], q_BNHK.shape[2]
  kernel = _kernel(num_q, num_kv, num_heads, scale, BLOCK, interpret)

  def one_row(q_NHK, k_THK, v_THK, q_valid_N, kv_valid_T):
    heads_major = lambda x: jnp.swapaxes(x, 0, 1)  # splash takes [H, length, K]
    segments = kernel_lib.SegmentIds(q=q_valid_N.astype(jnp.int32),
                                     kv=kv_valid_T.astype(jnp.int32))
    out_HNK = kernel(heads_major(q_NHK), heads_major(k_THK), heads_major(v_THK),
                     segment_ids=segments)
    return heads_major(out_HNK)

  out_BNHK = jax.vmap(one_row)(q_BNHK, k_BTHK, v_BTHK, q_valid_BN, kv_valid_BT)
  return jnp.where(q_valid_BN[:, :, None, None], out_BNHK, 0).astype(v_BTHK.dtype)
