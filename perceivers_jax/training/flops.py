"""FLOPs per window and model FLOPs utilisation (MFU), as perceiver-ar's reference counts them.

Throughput counts predicted slots (global batch x N per step). MFU uses 3 x the forward
matmul FLOPs of one window (`train_flops_per_window`) against the peak FLOP/s of the device
(`PEAK_TFLOPS`, or config.train.peak_tflops when set).
"""

import jax
import ml_collections

from perceivers_jax.model import perceivers as model_lib

# Peak FLOP/s, one kind of figure only: the vendor's datasheet dense (no sparsity) bf16 peak
# per chip, TFLOP/s (NVIDIA: the SXM parts). A measured peak is not a datasheet figure and goes
# in config.train.peak_tflops instead, e.g. 790 for the perceiver-ar H200 reference MFU.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def forward_flops_per_window(model_config: ml_collections.ConfigDict) -> float:
  """Matmul FLOPs (2 per multiply-add) of one forward pass over one window.

  With N latents, width D, attention width A = heads x head_dim, MLP width F, vocabulary V,
  S latent layers, and K_c keys for cross-attention layer c (L, or N + W - 1 for a windowed
  sliding scale W: `perceivers.cross_key_lengths`, what the layer computes):
    each cross-attention layer: q and output projections 2 x 2NDA, K/V projections of its
      K_c inputs 2 x 2 K_c DA, scores and weighted values 2 x 2N K_c A, MLP 2 x 2NDF;
    each latent layer: q/k/v/output projections 4 x 2NDA, scores and values 2 x 2NNA,
      MLP 2 x 2NDF;
    initial latent map 2NDD and output head 2NDV.
  At paper size with one full cross-attention layer this is 1.02 TFLOP (perceiver-ar's
  reference: 3.06 TFLOP x 1/3 training). PerceiverS's [full, 1024] trains at 3.18 TFLOP per
  window with the short scale windowed (2,047 keys); keying all L inputs there
  (windowed_scales=False) costs 3.95, i.e. 0.77 TFLOP (19.6%) that the masks throw away.
  """
  m = model_config
  N, D = m.num_latents, m.embed_dim
  A, F, V = m.num_heads * m.head_dim, m.mlp_ratio * m.embed_dim, m.vocab_size
  cross = sum(2 * (2 * N * D * A + 2 * keys * D * A + 2 * N * keys * A + 2 * N * D * F)
              for keys in model_lib.cross_key_lengths(m))
  latent = 2 * (4 * N * D * A + 2 * N * N * A + 2 * N * D * F)
  return float(cross + m.num_latent_layers * latent + 2 * N * D * D + 2 * N * D * V)


def train_flops_per_window(model_config: ml_collections.ConfigDict) -> float:
  """Training FLOPs per window: forward + backward = 3 x forward matmul FLOPs."""
  return 3.0 * forward_flops_per_window(model_config)


def peak_flops_per_device(config: ml_collections.ConfigDict) -> float | None:
  """Peak FLOP/s of one device: config.train.peak_tflops if > 0, else the table; None if unknown."""
  override = config.train.peak_tflops
  if override:
    return override * 1e12
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None


def throughput(step_time: float, config: ml_collections.ConfigDict,
                peak: float | None) -> dict[str, float]:
  """Step time, predicted tokens/s (global batch x N), TFLOP/s per device and MFU."""
  flops_per_device = (train_flops_per_window(config.model) * config.train.batch_size / step_time
                      / jax.device_count())
  out = {"step_time_s": step_time,
         "tokens_per_s": config.train.batch_size * config.model.num_latents / step_time,
         "tflops_per_s_per_device": flops_per_device / 1e12}
  if peak:
    out["mfu"] = flops_per_device / peak
  return out
