"""FID, sFID, Inception Score, precision and recall as OpenAI's ADM evaluator defines them.

    mu, sigma = statistics(pool_ND)                          # float64 mean and covariance
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)      # sFID: the same on 'spatial'
    is_ = inception_score(logits_NK)                          # 5000-image splits (10 at 50k)
    precision, recall = precision_recall(pool_ref, pool_samples)   # k = 3, blocks of 10k

- Frechet distance: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), in float64; the
  trace of the root from symmetric eigendecompositions by default, or ADM's own route
  (scipy's sqrtm with its eps retry) with method='sqrtm'.
- Inception Score: softmax of the logits, then per consecutive split of `split_size` images
  exp(mean_i KL(p_i || mean p)), averaged over the splits.
- Precision / recall (Kynkaanniemi et al. 2019): each feature's radius is its squared
  distance to its k-th nearest neighbour in its own set (itself counted as the 0th);
  precision = share of samples inside some reference ball, recall = share of references
  inside some sample ball. Distances are computed in (row, column) blocks on the device, so
  no N x N matrix is ever held; only the k + 1 smallest per row are kept.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

IS_SPLIT_SIZE = 5000  # ADM: consecutive splits of 5000 images (10 splits at 50k)
NEIGHBOURHOOD = 3  # ADM / Kynkaanniemi et al.: k of the k-NN radius
BLOCK = 10_000  # ADM's row and column batch of the pairwise distances


# ----------------------------------------------------------------------------- FID / sFID

def statistics(features_ND) -> tuple[np.ndarray, np.ndarray]:
  """(mu (D,), sigma (D, D)) in float64; sigma is the unbiased covariance (np.cov)."""
  x = np.asarray(features_ND, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'statistics need (N >= 2, D) features, got shape {x.shape}')
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = 'eigh',
                     eps: float = 1e-6) -> float:
  """Frechet distance of two Gaussians in float64 (see the module docstring).

  method: how tr(sqrtm(S1 S2)) is computed.
    'eigh' (default): sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), two symmetric
      eigendecompositions; the same number for full-rank statistics, ~10x faster than
      sqrtm at 2048 dimensions and stable for rank-deficient ones (fewer images than D).
    'sqrtm': ADM's and pytorch-fid's route: scipy's sqrtm of the product, retried with eps
      on the diagonals when not finite, an imaginary diagonal part above 1e-3 is an error.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, '
                     f'sigma {s1.shape} vs {s2.shape}')
  if method == 'eigh':
    tr_root = _trace_sqrt_product_eigh(s1, s2)
  elif method == 'sqrtm':
    tr_root = _trace_sqrt_product_sqrtm(s1, s2, eps)
  else:
    raise ValueError(f"frechet_distance method must be 'eigh' or 'sqrtm', got {method!r}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_root)


def frechet_distance_of_features(features_ND, mu2, sigma2) -> float:
  """Frechet distance of the statistics of `features_ND` to (mu2, sigma2), float64.

  Equals `frechet_distance(*statistics(features_ND), mu2, sigma2)`. With fewer images than
  dimensions (N <= D, e.g. a quick FID on a few hundred samples) sigma1 = A^T A has rank < N,
  and the non-zero eigenvalues of sigma1 sigma2 are those of the N x N matrix A sigma2 A^T:
  exact, and O(N D^2) instead of O(D^3).
  """
  x = np.asarray(features_ND, np.float64)
  n, d = x.shape
  if n > d:
    return frechet_distance(*statistics(x), mu2, sigma2)
  mu1, _ = statistics(x)
  mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
  if mu2.shape != (d,) or s2.shape != (d, d):
    raise ValueError(f'statistics do not match: features have D={d}, reference mu {mu2.shape}, '
                     f'sigma {s2.shape}')
  a = (x - mu1) / np.sqrt(n - 1)  # sigma1 = a.T @ a
  m = a @ s2 @ a.T
  lam = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_root = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(a * a) + np.trace(s2) - 2.0 * tr_root)


def _trace_sqrt_product_eigh(s1, s2) -> float:
  # S1 S2 is similar to the PSD matrix S1^1/2 S2 S1^1/2: same (real, >= 0) eigenvalues.
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = root1 @ s2 @ root1
  lam = np.linalg.eigvalsh(0.5 * (m + m.T))
  return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(s1, s2, eps: float) -> float:
  from scipy import linalg
  with warnings.catch_warnings():  # singular products are handled below, as ADM does
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    root = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
      offset = np.eye(s1.shape[0]) * eps
      root = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(root):
    imag = np.abs(np.diagonal(root).imag).max()
    if imag > 1e-3:
      raise ValueError(f'Frechet distance: sqrtm has an imaginary diagonal part of {imag:.3g}')
    root = root.real
  return float(np.trace(root))


# ----------------------------------------------------------------------------- Inception Score

def inception_score(logits_NK, split_size: int = IS_SPLIT_SIZE) -> float:
  """Mean over consecutive splits of exp(E_i KL(softmax_i || split mean)), float64."""
  logits = np.asarray(logits_NK, np.float64)
  if logits.ndim != 2 or not len(logits):
    raise ValueError(f'inception_score needs (N >= 1, K) logits, got shape {logits.shape}')
  if split_size < 1:
    raise ValueError(f'split_size must be >= 1, got {split_size}')
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for lo in range(0, len(log_p), split_size):
    lp = log_p[lo:lo + split_size]
    p = np.exp(lp)
    log_marginal = np.log(p.mean(axis=0, keepdims=True))
    scores.append(np.exp(np.mean(np.sum(p * (lp - log_marginal), axis=1))))
  return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision / recall

def _sq_distances(u_RD, v_CD):
  """(R, C) squared Euclidean distances, clamped at 0, fp32 at full precision."""
  hp = jax.lax.Precision.HIGHEST
  nu = jnp.sum(u_RD * u_RD, axis=1)[:, None]
  nv = jnp.sum(v_CD * v_CD, axis=1)[None, :]
  return jnp.maximum(nu - 2.0 * jnp.dot(u_RD, v_CD.T, precision=hp) + nv, 0.0)


@functools.partial(jax.jit, static_argnames='k')
def _smallest_update(best_Rk, u_RD, v_CD, num_valid_cols, *, k: int):
  """Merges the k + 1 smallest distances of a block into the running (R, k + 1) smallest."""
  d = _sq_distances(u_RD, v_CD)
  d = jnp.where(jnp.arange(d.shape[1])[None, :] < num_valid_cols, d, jnp.inf)
  neg, _ = jax.lax.top_k(-jnp.concatenate([best_Rk, d], axis=1), k + 1)
  return -neg


@jax.jit
def _inside_update(ref_in_R, sample_in_C, ref_RD, radii_ref_R, sample_CD, radii_sample_C):
  """ORs in which refs lie in some sample ball and which samples lie in some ref ball."""
  d = _sq_distances(ref_RD, sample_CD)
  return (ref_in_R | jnp.any(d <= radii_sample_C[None, :], axis=1),
          sample_in_C | jnp.any(d <= radii_ref_R[:, None], axis=0))


def _blocks(x_ND: np.ndarray, block: int, fill: float = 0.0):
  """Yields (start, padded (block, ...) block, number of real rows)."""
  for lo in range(0, len(x_ND), block):
    part = x_ND[lo:lo + block]
    n = len(part)
    if n < block:
      part = np.concatenate([part, np.full((block - n,) + part.shape[1:], fill, part.dtype)])
    yield lo, part, n


def manifold_radii(features_ND, k: int = NEIGHBOURHOOD, block: int = BLOCK) -> np.ndarray:
  """(N,) float32 squared distance of every feature to its k-th nearest neighbour (self = 0th)."""
  x = np.asarray(features_ND, np.float32)
  if x.ndim != 2 or len(x) <= k:
    raise ValueError(f'manifold radii with k={k} need more than {k} features, got shape {x.shape}')
  block = min(block, len(x))
  radii = np.empty(len(x), np.float32)
  for lo, rows, n_rows in _blocks(x, block):
    best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
    for _, cols, n_cols in _blocks(x, block):
      best = _smallest_update(best, rows, cols, n_cols, k=k)
    radii[lo:lo + n_rows] = np.asarray(best[:n_rows, k])
  return radii


def precision_recall(ref_ND, samples_ND, k: int = NEIGHBOURHOOD,
                     block: int = BLOCK) -> tuple[float, float]:
  """(precision, recall) of samples against references (pool features), ADM's definition."""
  ref, smp = np.asarray(ref_ND, np.float32), np.asarray(samples_ND, np.float32)
  if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
    raise ValueError(f'precision_recall needs (N, D) features of one D, got {ref.shape} and '
                     f'{smp.shape}')
  radii_ref, radii_smp = manifold_radii(ref, k, block), manifold_radii(smp, k, block)
  rb, cb = min(block, len(ref)), min(block, len(smp))
  ref_in = np.zeros(len(ref), bool)
  smp_in = np.zeros(len(smp), bool)
  # Padding rows get radius -1: no distance (>= 0) is ever inside their ball.
  for lo, rows, n_rows in _blocks(ref, rb):
    r_rad = np.concatenate([radii_ref[lo:lo + n_rows], -np.ones(rb - n_rows, np.float32)])
    got_r = jnp.zeros(rb, bool)
    for lo2, cols, n_cols in _blocks(smp, cb):
      c_rad = np.concatenate([radii_smp[lo2:lo2 + n_cols], -np.ones(cb - n_cols, np.float32)])
      got_r, got_c = _inside_update(got_r, jnp.zeros(cb, bool), rows, r_rad, cols, c_rad)
      smp_in[lo2:lo2 + n_cols] |= np.asarray(got_c[:n_cols])
    ref_in[lo:lo + n_rows] = np.asarray(got_r[:n_rows])
  return float(smp_in.mean()), float(ref_in.mean())
