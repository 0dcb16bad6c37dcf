"""Set comparison (BUILD section 7, after Yang & Lerch 2018 / mgeval).

For one feature: intra-set distances (all ordered pairs of distinct pieces of a set, as
mgeval's leave-one-out loop: n (n - 1) values) and inter-set distances (every generated
piece against every reference piece); Euclidean, which is the Frobenius norm for
matrices. Each distance sample gets a Gaussian KDE (`scipy.stats.gaussian_kde`, Scott's
rule) and the pair is summarised by

* OA: the integral of min(p, q) over the data range [min, max] of both samples
  (trapezoid rule on GRID_POINTS points; mgeval uses `integrate.quad`, which agrees to
  about 1e-3 and is far slower).
* KLD = KL(p || q) on densities sampled at GRID_POINTS points and normalised to sum 1
  (`scipy.stats.entropy`), two ways:
  - `shared_grid` (default): both densities on one grid over the union range. A sample
    shifted or stretched away from the other gives a large KLD. q is floored at
    KLD_FLOOR so disjoint densities give a large finite value (about 27.6 at most).
  - `mgeval`: exactly mgeval's `utils.kl_dist`: each density on a grid over its own
    sample's range. The two grids are compared point by point, so the value only sees
    the densities' shapes: a shifted copy of a sample scores 0, while a generated set
    identical to the reference does not (its inter-set sample adds the zero
    self-distances, which stretches its own range). Kept to compare with published
    tables (the paper's Table I used mgeval).

Singular samples (fewer than two values, or all equal: the KDE's covariance is singular)
do not crash: such a sample becomes a Gaussian at its value with the other sample's KDE
bandwidth. If both are singular they are point masses: OA = 1 and KLD = 0 when equal;
OA = 0 and shared-grid KLD = -log(KLD_FLOOR) when not (mgeval mode: 0, as each density
is constant on its own one-point range).
"""

from collections.abc import Callable, Mapping

import numpy as np
from scipy import integrate
from scipy import spatial
from scipy import special
from scipy import stats

KLD_MODES = ("shared_grid", "mgeval")
GRID_POINTS = 1000  # mgeval's `kl_dist` num_sample.
KLD_FLOOR = 1e-12
_SINGULAR_RTOL = 1e-12

Pdf = Callable[[np.ndarray], np.ndarray]


def _flatten(values: np.ndarray) -> np.ndarray:
  values = np.asarray(values, np.float64)
  return values.reshape(values.shape[0], -1)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[n, m] Euclidean (Frobenius) distances between the feature values of two sets."""
  return spatial.distance.cdist(_flatten(a), _flatten(b))


def intra_set_distances(values: np.ndarray) -> np.ndarray:
  """n (n - 1) distances: every ordered pair of distinct pieces (mgeval's leave-one-out)."""
  n = len(values)
  dist_nn = pairwise_distances(values, values)
  return dist_nn[~np.eye(n, dtype=bool)]


def inter_set_distances(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """n_generated * n_reference distances: every generated piece to every reference piece."""
  return pairwise_distances(generated, reference).reshape(-1)


def _is_singular(sample: np.ndarray) -> bool:
  scale = max(1.0, float(np.abs(sample).max()))
  return sample.size < 2 or float(np.ptp(sample)) <= _SINGULAR_RTOL * scale


def _check(sample: np.ndarray, name: str) -> np.ndarray:
  sample = np.asarray(sample, np.float64).reshape(-1)
  if not sample.size:
    raise ValueError(f"{name} distance sample is empty (a set needs at least 2 pieces "
                     "for intra-set distances)")
  if not np.all(np.isfinite(sample)):
    raise ValueError(f"{name} distance sample holds non-finite values")
  return sample


def density(sample: np.ndarray, fallback_bandwidth: float | None = None) -> Pdf | None:
  """Gaussian KDE (Scott's rule) of a 1-D sample.

  A singular sample (fewer than two values, or all equal) gives a Gaussian at its value
  with fallback_bandwidth, or None (a point mass) without one.
  """
  sample = _check(sample, "the")
  if not _is_singular(sample):
    return stats.gaussian_kde(sample).evaluate
  if fallback_bandwidth is None:
    return None
  center = float(sample[0])
  return lambda x: stats.norm.pdf(x, loc=center, scale=fallback_bandwidth)


def scott_bandwidth(sample: np.ndarray) -> float | None:
  """The standard deviation of a sample's KDE kernel; None for a singular sample."""
  sample = _check(sample, "the")
  if _is_singular(sample):
    return None
  return float(np.sqrt(stats.gaussian_kde(sample).covariance[0, 0]))


def fit_densities(a: np.ndarray, b: np.ndarray) -> tuple[Pdf, Pdf] | None:
  """Gaussian KDEs (Scott's rule) of two samples; None if both are singular.

  A singular sample becomes a Gaussian at its value with the other sample's bandwidth.
  """
  a, b = _check(a, "first"), _check(b, "second")
  pdf_a = density(a, scott_bandwidth(b) if _is_singular(a) else None)
  pdf_b = density(b, scott_bandwidth(a) if _is_singular(b) else None)
  if pdf_a is None or pdf_b is None:
    return None
  return pdf_a, pdf_b


def _same_point(a: np.ndarray, b: np.ndarray) -> bool:
  scale = max(1.0, abs(float(a[0])), abs(float(b[0])))
  return abs(float(a[0]) - float(b[0])) <= _SINGULAR_RTOL * scale


def _shared_grid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), GRID_POINTS)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
  p = p / p.sum()
  q = np.maximum(q / q.sum(), KLD_FLOOR)
  return float(special.rel_entr(p, q).sum())


def compare_samples(a: np.ndarray, b: np.ndarray, kld: str = "shared_grid") -> dict[str, float]:
  """OA and KL(a || b) of two distance samples (see the module docstring)."""
  if kld not in KLD_MODES:
    raise ValueError(f"kld must be one of {KLD_MODES}, got {kld!r}")
  a, b = _check(a, "first"), _check(b, "second")
  pdfs = fit_densities(a, b)
  if pdfs is None:
    same = _same_point(a, b)
    kld_value = 0.0 if same or kld == "mgeval" else -float(np.log(KLD_FLOOR))
    return {"oa": 1.0 if same else 0.0, "kld": kld_value}
  pdf_a, pdf_b = pdfs
  grid = _shared_grid(a, b)
  p, q = pdf_a(grid), pdf_b(grid)
  oa = float(integrate.trapezoid(np.minimum(p, q), grid))
  if kld == "shared_grid":
    kld_value = _kl(p, q)
  else:
    own_a = np.linspace(a.min(), a.max(), GRID_POINTS)
    own_b = np.linspace(b.min(), b.max(), GRID_POINTS)
    kld_value = float(stats.entropy(pdf_a(own_a), pdf_b(own_b)))
  return {"oa": oa, "kld": kld_value}


def overlap_area(a: np.ndarray, b: np.ndarray) -> float:
  """OA of the KDEs of two samples over their joint data range."""
  return compare_samples(a, b)["oa"]


def kl_divergence(a: np.ndarray, b: np.ndarray, kld: str = "shared_grid") -> float:
  """KL(KDE(a) || KDE(b)), `shared_grid` or `mgeval` (see the module docstring)."""
  return compare_samples(a, b, kld)["kld"]


def _spread(sample: np.ndarray | None) -> dict[str, float | None]:
  if sample is None or not sample.size:
    return {"mean": None, "std": None}
  return {"mean": float(sample.mean()), "std": float(sample.std())}


def compare_feature(reference: np.ndarray, generated: np.ndarray, kld: str = "shared_grid",
                    reference_intra: np.ndarray | None = None) -> dict:
  """One feature of a generated set against the reference set.

  Args:
    reference: [n_ref, ...] feature values of the reference pieces (n_ref >= 2).
    generated: [n_gen, ...] feature values of the generated pieces (n_gen >= 1).
    kld: a KLD_MODES entry.
    reference_intra: the reference's intra-set distances, if already computed.

  Returns:
    {"kld", "oa"}: KL(reference intra || inter) and their OA (the reference's own spread
    is the target the inter-set distances should match); mean/std of the reference
    intra-set, generated intra-set (None for one piece) and inter-set distances; and
    the distance samples themselves under "distances" (for plots).
  """
  if len(reference) < 2:
    raise ValueError(f"the reference set needs at least 2 pieces, got {len(reference)}")
  if len(generated) < 1:
    raise ValueError("the generated set is empty")
  if reference_intra is None:
    reference_intra = intra_set_distances(reference)
  generated_intra = intra_set_distances(generated) if len(generated) >= 2 else None
  inter = inter_set_distances(generated, reference)
  result = compare_samples(reference_intra, inter, kld)
  result.update({
      "reference_intra": _spread(reference_intra),
      "generated_intra": _spread(generated_intra),
      "inter": _spread(inter),
      "distances": {"reference_intra": reference_intra, "generated_intra": generated_intra,
                    "inter": inter},
  })
  return result


def compare_sets(reference: Mapping[str, np.ndarray], generated: Mapping[str, np.ndarray],
                 kld: str = "shared_grid") -> dict[str, dict]:
  """compare_feature for every feature of two stacked feature dicts ({name: [n, ...]})."""
  missing = set(reference) ^ set(generated)
  if missing:
    raise ValueError(f"reference and generated features differ: {sorted(missing)}")
  return {name: compare_feature(reference[name], generated[name], kld) for name in reference}
