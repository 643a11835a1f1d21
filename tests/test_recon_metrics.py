"""PSNR, SSIM (Wang et al. 2004), codebook usage/perplexity and the sharpness ratio."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mvar_jax import recon_metrics as rm


def _ssim_scipy(x, y, data_range=2.0):
  """skimage's algorithm restated: Gaussian filter (sigma 1.5, truncate 3.5 -> 11 taps),
  population covariances, borders of (11 - 1) / 2 cropped, mean over pixels and channels."""
  out = []
  for xb, yb in zip(x.astype(np.float64), y.astype(np.float64)):
    per_channel = []
    for c in range(x.shape[-1]):
      a, b = xb[..., c], yb[..., c]
      f = lambda z: ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)
      ux, uy = f(a), f(b)
      vx, vy, vxy = f(a * a) - ux * ux, f(b * b) - uy * uy, f(a * b) - ux * uy
      c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
      s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
      per_channel.append(s[5:-5, 5:-5].mean())
    out.append(np.mean(per_channel))
  return np.array(out)


def test_ssim_matches_the_scipy_restatement_and_is_one_for_identical_images():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 24, 20, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  y[2] = ndimage.uniform_filter(x[2], size=(3, 3, 1))  # a blurred copy
  got = np.asarray(rm.ssim(jnp.asarray(x), jnp.asarray(y)))
  np.testing.assert_allclose(got, _ssim_scipy(x, y), atol=1e-5)
  assert np.all(got < 0.99)
  np.testing.assert_allclose(rm.ssim(jnp.asarray(x), jnp.asarray(x)), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match='window'):
    rm.ssim(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))


def test_psnr_of_a_known_error():
  x = jnp.zeros((2, 4, 4, 3))
  y = x.at[0].set(0.1).at[1].set(0.2)  # mse 0.01 and 0.04 on data range 2
  np.testing.assert_allclose(rm.psnr(x, y), [10 * np.log10(4 / 0.01), 10 * np.log10(4 / 0.04)],
                             rtol=1e-5)


def test_codebook_usage_and_perplexity_per_scale():
  hits = np.array([[5, 5, 5, 5, 0, 0, 0, 0],   # uniform over 4 codes -> perplexity 4
                   [9, 0, 0, 0, 0, 0, 0, 0],   # collapse -> perplexity 1
                   [0, 0, 0, 0, 0, 0, 0, 0]])  # unused scale
  s = rm.codebook_stats(hits)
  np.testing.assert_allclose(s['usage_S'], [0.5, 0.125, 0.0])
  np.testing.assert_allclose(s['perplexity_S'], [4.0, 1.0, 0.0], rtol=1e-12)
  assert s['usage'] == 0.5
  p = np.array([14, 5, 5, 5]) / 29
  np.testing.assert_allclose(s['perplexity'], np.exp(-(p * np.log(p)).sum()))
  with pytest.raises(ValueError, match='scales, vocab'):
    rm.codebook_stats(np.zeros(8))


def test_high_frequency_ratio_flags_blur():
  x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3))
  assert rm.high_frequency_ratio(x, x) == pytest.approx(1.0)
  blurred = ndimage.gaussian_filter(x, sigma=(0, 1.5, 1.5, 0))
  assert rm.high_frequency_ratio(blurred, x) < 0.2
