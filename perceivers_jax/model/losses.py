"""Cross-entropy + z-loss over the latent block's valid targets, as sums and counts.

`token_losses` gives per-target arrays; `sum_losses` reduces them to sums and a count, so
means over microbatches, devices and hosts are exact (sum everything, divide once with
`mean_loss`). Logits are used in float32.
"""

import jax
import jax.numpy as jnp

from perceivers_jax.data import tokens
from perceivers_jax.model import masks


def token_losses(logits_BNV: jax.Array, batch: dict[str, jax.Array], num_latents: int,
                 z_loss_weight: float) -> dict[str, jax.Array]:
  """Per-target losses of the latent block.

  Returns float32 arrays [B, N] nll_BN, z_loss_BN (z_loss_weight * log(Z)^2), correct_BN
  (argmax == target), weights_BN (1 for real targets, 0 for PAD), all already multiplied by
  the weights, and int32 positions_BN (the target's absolute position, -1 where no target).
  """
  inputs_BL = batch["inputs"]
  targets_BN = masks.gather_latent_block(batch["targets"], inputs_BL, num_latents)
  positions_BN = masks.gather_latent_block(batch["positions"], inputs_BL, num_latents)
  weights_BN = (targets_BN != tokens.PAD_ID).astype(jnp.float32)
  logits_BNV = logits_BNV.astype(jnp.float32)
  log_z_BN = jax.nn.logsumexp(logits_BNV, axis=-1)
  target_logit_BN = jnp.take_along_axis(logits_BNV, targets_BN[..., None], axis=-1)[..., 0]
  correct_BN = (jnp.argmax(logits_BNV, axis=-1) == targets_BN).astype(jnp.float32)
  return dict(
      nll_BN=(log_z_BN - target_logit_BN) * weights_BN,
      z_loss_BN=z_loss_weight * jnp.square(log_z_BN) * weights_BN,
      correct_BN=correct_BN * weights_BN,
      weights_BN=weights_BN,
      positions_BN=jnp.where(weights_BN > 0, positions_BN + 1, -1).astype(jnp.int32),
  )


def sum_losses(per_token: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums over targets: nll, z_loss, correct and count (number of real targets)."""
  return dict(nll=per_token["nll_BN"].sum(), z_loss=per_token["z_loss_BN"].sum(),
              correct=per_token["correct_BN"].sum(), count=per_token["weights_BN"].sum())


def mean_loss(sums: dict[str, jax.Array]) -> jax.Array:
  """Training objective: (nll + z_loss) per target (0 when there is no target)."""
  return (sums["nll"] + sums["z_loss"]) / jnp.maximum(sums["count"], 1.0)

