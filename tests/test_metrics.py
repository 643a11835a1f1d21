"""FID/sFID, IS and precision/recall equal pytorch-fid and a plain numpy restatement of ADM."""

import numpy as np
import pytest

from mvar_jax.evaluation import metrics
from pytorch_fid_ref import import_pytorch_fid  # tests/pytorch_fid_ref.py


def _gaussian_features(seed, n=600, d=32, shift=0.0):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  return (rng.standard_normal((n, d)) @ mix + shift).astype(np.float32)


# ----------------------------------------------------------------------------- FID

@pytest.mark.parametrize('method', ['eigh', 'sqrtm'])
def test_fid_equals_pytorch_fid(method):
  import_pytorch_fid()
  from pytorch_fid.fid_score import calculate_frechet_distance
  a, b = _gaussian_features(0), _gaussian_features(1, shift=0.3)
  (mu1, s1), (mu2, s2) = metrics.statistics(a), metrics.statistics(b)
  want = calculate_frechet_distance(mu1, s1, mu2, s2)
  got = metrics.frechet_distance(mu1, s1, mu2, s2, method=method)
  assert want > 1.0
  assert abs(got - want) <= 1e-6 * abs(want)
  # The statistics are np.mean / np.cov in float64, as the ADM evaluator computes them.
  np.testing.assert_array_equal(mu1, np.mean(a.astype(np.float64), axis=0))
  np.testing.assert_array_equal(s1, np.cov(a, rowvar=False))
  assert mu1.dtype == s1.dtype == np.float64


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
  a = _gaussian_features(2)
  mu, s = metrics.statistics(a)
  assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-6
  rng = np.random.default_rng(3)
  noise = rng.standard_normal(a.shape).astype(np.float32)
  fids = [metrics.frechet_distance(*metrics.statistics(a + level * noise), mu, s)
          for level in (0.05, 0.2, 0.5, 1.0)]
  assert fids[0] > 0 and np.all(np.diff(fids) > 0), fids


def test_fid_of_rank_deficient_statistics_is_stable():
  # Fewer images than dimensions (a during-training FID on few samples): both routes agree,
  # and a set against itself is still ~0.
  a, b = _gaussian_features(10, n=20), _gaussian_features(11, n=20, shift=0.5)
  (mu1, s1), (mu2, s2) = metrics.statistics(a), metrics.statistics(b)
  eigh = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert eigh == pytest.approx(metrics.frechet_distance(mu1, s1, mu2, s2, method='sqrtm'),
                               rel=1e-4)
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


@pytest.mark.parametrize('n', [20, 33, 40])  # fewer, as many as and more images than dimensions
def test_fid_of_features_equals_fid_of_their_statistics(n):
  a, b = _gaussian_features(12, n=n), _gaussian_features(13, shift=0.2)
  mu2, s2 = metrics.statistics(b)
  want = metrics.frechet_distance(*metrics.statistics(a), mu2, s2, method='sqrtm')
  assert metrics.frechet_distance_of_features(a, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_fid_rejects_mismatched_statistics_and_unknown_methods():
  mu, s = metrics.statistics(_gaussian_features(4))
  with pytest.raises(ValueError, match='do not match'):
    metrics.frechet_distance(mu, s, mu[:-1], s[:-1, :-1])
  with pytest.raises(ValueError, match='method'):
    metrics.frechet_distance(mu, s, mu, s, method='svd')


# ----------------------------------------------------------------------------- IS

def _adm_inception_score(logits, split_size):
  """The ADM evaluator's formula, restated plainly (softmax, then per-split KL to the mean)."""
  e = np.exp(logits - logits.max(1, keepdims=True))
  preds = e / e.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def test_inception_score_equals_the_adm_formula_over_uneven_splits():
  logits = 3.0 * np.random.default_rng(5).standard_normal((1050, 1008))
  want = _adm_inception_score(logits, 200)  # 5 full splits and one of 50
  got = metrics.inception_score(logits, split_size=200)
  assert want > 2.0
  assert abs(got - want) <= 1e-6 * want
  assert metrics.inception_score(logits) == pytest.approx(_adm_inception_score(logits, 5000),
                                                          rel=1e-6)


def test_inception_score_of_one_class_is_one_and_of_k_even_classes_is_k():
  one = np.zeros((300, 1008))
  one[:, 17] = 50.0
  assert metrics.inception_score(one, split_size=100) == pytest.approx(1.0, abs=1e-9)
  k = np.zeros((400, 1008))
  k[np.arange(400), np.arange(400) % 8] = 50.0
  assert metrics.inception_score(k, split_size=200) == pytest.approx(8.0, rel=1e-6)


# ----------------------------------------------------------------------------- precision / recall

def _adm_precision_recall(ref, smp, k=3):
  """Full pairwise squared distances in float64; radius = k-th smallest of a row (self = 0th)."""
  def d2(u, v):
    u, v = u.astype(np.float64), v.astype(np.float64)
    return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)
  r_ref = np.partition(d2(ref, ref), k, axis=1)[:, k]
  r_smp = np.partition(d2(smp, smp), k, axis=1)[:, k]
  d = d2(ref, smp)
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_smp[None, :], axis=1))
  return precision, recall


@pytest.mark.parametrize('kind', ['gaussian', 'integer'])
def test_precision_recall_equal_the_adm_formula_in_blocks(kind):
  rng = np.random.default_rng(6)
  if kind == 'gaussian':
    ref, smp = _gaussian_features(7, n=300, d=16), _gaussian_features(8, n=250, d=16, shift=0.4)
  else:  # exact distances with many ties: the '<=' of a ball's border is tested too
    ref = rng.integers(0, 4, (300, 8)).astype(np.float32)
    smp = rng.integers(1, 5, (250, 8)).astype(np.float32)
  want = _adm_precision_recall(ref, smp)
  # Blocks of 64 rows/columns: several blocks per axis, the last ones padded.
  got = metrics.precision_recall(ref, smp, block=64)
  assert 0.05 < want[0] < 0.999 and 0.05 < want[1] < 0.999, want
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  np.testing.assert_allclose(metrics.precision_recall(ref, smp), want, rtol=1e-6, atol=0)


def test_radii_are_kth_neighbour_distances_and_a_set_covers_itself():
  x = _gaussian_features(9, n=130, d=8)
  d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
  np.testing.assert_allclose(metrics.manifold_radii(x, block=50), np.sort(d, 1)[:, 3], rtol=1e-4)
  assert metrics.precision_recall(x, x, block=50) == (1.0, 1.0)


def test_precision_recall_need_more_than_k_features():
  with pytest.raises(ValueError, match='more than 3'):
    metrics.precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
