"""Set comparison: distances, KDE overlap area, both KLD modes, singular samples."""

import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from perceivers_jax.evaluation import distances


def _mgeval_kl_dist(a, b, num_sample=1000):
  """mgeval utils.kl_dist, as published (the reference for the `mgeval` mode)."""
  pdf_a, pdf_b = stats.gaussian_kde(a), stats.gaussian_kde(b)
  sample_a = np.linspace(np.min(a), np.max(a), num_sample)
  sample_b = np.linspace(np.min(b), np.max(b), num_sample)
  return stats.entropy(pdf_a(sample_a), pdf_b(sample_b))


def test_intra_and_inter_distances():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3, 4))  # matrices: Frobenius distances
  y = rng.normal(size=(2, 3, 4))
  intra = distances.intra_set_distances(x)
  assert intra.shape == (20,)  # ordered pairs, as mgeval's leave-one-out
  expected = [np.linalg.norm(x[i] - x[j]) for i in range(5) for j in range(5) if i != j]
  np.testing.assert_allclose(intra, expected)
  inter = distances.inter_set_distances(y, x)
  np.testing.assert_allclose(
      inter, [np.linalg.norm(y[i] - x[j]) for i in range(2) for j in range(5)])


def test_identical_samples_and_sets():
  rng = np.random.default_rng(1)
  a = rng.gamma(3.0, size=400)
  for mode in distances.KLD_MODES:
    result = distances.compare_samples(a, a, mode)
    assert result["kld"] == pytest.approx(0.0, abs=1e-12)
    assert result["oa"] > 0.98  # only the KDE tails beyond the data range are missing
  # A generated set equal to the reference: inter-set = intra-set plus the zero
  # self-distances, so the match is close but not exact.
  x = rng.normal(size=(30, 12))
  result = distances.compare_feature(x, x, "shared_grid")
  assert result["oa"] > 0.9 and result["kld"] < 0.05
  assert result["generated_intra"] == result["reference_intra"]


def test_shift_is_invisible_to_mgeval_kld_only():
  rng = np.random.default_rng(2)
  a = rng.gamma(3.0, size=400)
  b = a + 2.0 * a.std()
  mgeval = distances.compare_samples(a, b, "mgeval")
  shared = distances.compare_samples(a, b, "shared_grid")
  # mgeval samples each density on its own range: a shifted copy looks identical.
  assert mgeval["kld"] == pytest.approx(0.0, abs=1e-9)
  assert shared["kld"] > 1.0
  assert shared["oa"] == mgeval["oa"] < 0.5


def test_mgeval_mode_reproduces_mgeval():
  rng = np.random.default_rng(3)
  a, b = rng.gamma(2.0, size=300), rng.normal(4.0, 2.0, size=200)
  assert distances.kl_divergence(a, b, "mgeval") == pytest.approx(_mgeval_kl_dist(a, b),
                                                                  rel=1e-12)


def test_overlap_area_matches_quadrature():
  rng = np.random.default_rng(4)
  a, b = rng.gamma(2.0, size=60), rng.normal(3.0, 1.5, size=40)
  pdf_a, pdf_b = stats.gaussian_kde(a), stats.gaussian_kde(b)
  lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
  quad = integrate.quad(lambda t: min(pdf_a(t)[0], pdf_b(t)[0]), lo, hi, limit=50)[0]
  assert distances.overlap_area(a, b) == pytest.approx(quad, abs=2e-3)


def test_singular_samples_give_defined_answers():
  same = distances.compare_samples([1.5, 1.5, 1.5], [1.5])
  assert same == {"oa": 1.0, "kld": 0.0}
  apart = distances.compare_samples([1.0, 1.0], [2.0, 2.0, 2.0])
  assert apart["oa"] == 0.0
  assert apart["kld"] == pytest.approx(-np.log(distances.KLD_FLOOR))
  assert distances.kl_divergence([1.0, 1.0], [2.0], "mgeval") == 0.0
  # One point mass against a spread sample: a Gaussian with the other's bandwidth.
  spread = np.random.default_rng(5).normal(size=200)
  for mode in distances.KLD_MODES:
    near = distances.compare_samples(np.zeros(10), spread, mode)
    far = distances.compare_samples(np.full(10, 5.0), spread, mode)
    assert 0.0 < far["oa"] < near["oa"] < 1.0
    assert np.isfinite(near["kld"]) and np.isfinite(far["kld"])
  assert (distances.compare_samples(np.full(10, 5.0), spread)["kld"] >
          distances.compare_samples(np.zeros(10), spread)["kld"])


def test_constant_features_do_not_crash():
  reference = np.ones((4, 12))  # identical pieces: intra-set distances all 0
  result = distances.compare_feature(reference, np.ones((3, 12)))
  assert result["oa"] == 1.0 and result["kld"] == 0.0
  result = distances.compare_feature(reference, np.zeros((1, 12)))  # one generated piece
  assert result["oa"] == 0.0 and result["generated_intra"]["mean"] is None


def test_bad_samples_raise():
  with pytest.raises(ValueError, match="at least 2 pieces"):
    distances.compare_feature(np.ones((1, 3)), np.ones((2, 3)))
  with pytest.raises(ValueError, match="empty"):
    distances.compare_samples([], [1.0, 2.0])
  with pytest.raises(ValueError, match="non-finite"):
    distances.compare_samples([np.nan, 1.0], [1.0, 2.0])
  with pytest.raises(ValueError, match="kld must be one of"):
    distances.compare_samples([0.0, 1.0], [1.0, 2.0], "symmetric")
