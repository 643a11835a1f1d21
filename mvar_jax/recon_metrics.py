"""Reconstruction and codebook metrics of a tokenizer: PSNR, SSIM, usage and perplexity.

Images are (B, H, W, C) in [-1, 1] (data range 2). SSIM is Wang et al. (2004): an 11x11
Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per channel on the valid
region and averaged (skimage's `structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False)`). Codebook perplexity per scale is exp(entropy) of the code
frequencies: V for a uniform codebook, 1 for collapse onto one code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 2.0  # images in [-1, 1]


def psnr(x_BHWC, y_BHWC, data_range: float = DATA_RANGE):
  """Per-image PSNR in dB, (B,)."""
  mse = jnp.mean(jnp.square(x_BHWC - y_BHWC), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps, (size,)."""
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-0.5 * (t / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def _blur_valid(x_BHWC, g):
  """Separable 'valid' Gaussian filter, per channel: (B, H, W, C) -> (B, H-k+1, W-k+1, C)."""
  b, h, w, c = x_BHWC.shape
  x = jnp.moveaxis(x_BHWC, -1, 1).reshape(b * c, 1, h, w)
  k = jnp.asarray(g)
  dn = ('NCHW', 'OIHW', 'NCHW')
  hp = jax.lax.Precision.HIGHEST
  x = jax.lax.conv_general_dilated(x, k.reshape(1, 1, -1, 1), (1, 1), 'VALID',
                                   dimension_numbers=dn, precision=hp)
  x = jax.lax.conv_general_dilated(x, k.reshape(1, 1, 1, -1), (1, 1), 'VALID',
                                   dimension_numbers=dn, precision=hp)
  return jnp.moveaxis(x.reshape(b, c, *x.shape[2:]), 1, -1)


def ssim(x_BHWC, y_BHWC, data_range: float = DATA_RANGE, window: int = 11, sigma: float = 1.5):
  """Per-image mean SSIM, (B,). Needs H, W >= window."""
  if x_BHWC.shape != y_BHWC.shape or x_BHWC.ndim != 4:
    raise ValueError(f'ssim needs two (B, H, W, C) batches of one shape, got {x_BHWC.shape} and '
                     f'{y_BHWC.shape}')
  if min(x_BHWC.shape[1:3]) < window:
    raise ValueError(f'ssim window {window} exceeds the image size {x_BHWC.shape[1:3]}')
  g = gaussian_window(window, sigma)
  x, y = x_BHWC.astype(jnp.float32), y_BHWC.astype(jnp.float32)
  mu_x, mu_y = _blur_valid(x, g), _blur_valid(y, g)
  var_x = _blur_valid(x * x, g) - mu_x ** 2
  var_y = _blur_valid(y * y, g) - mu_y ** 2
  cov = _blur_valid(x * y, g) - mu_x * mu_y
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def codebook_stats(hits_SV) -> dict[str, np.ndarray]:
  """Per-scale usage (share of codes hit) and perplexity from hit counts (K, V).

  Returns {'usage_S': (K,), 'perplexity_S': (K,), 'usage': overall share, 'perplexity':
  of the pooled counts}. A scale without hits has perplexity 0.
  """
  hits = np.asarray(hits_SV, np.float64)
  if hits.ndim != 2:
    raise ValueError(f'hits must be (scales, vocab), got shape {hits.shape}')

  def perplexity(counts):
    total = counts.sum(-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return np.where(total[..., 0] > 0, np.exp(ent), 0.0)

  return dict(usage_S=(hits > 0).mean(-1), perplexity_S=perplexity(hits),
              usage=float((hits.sum(0) > 0).mean()), perplexity=float(perplexity(hits.sum(0))))


def high_frequency_ratio(rec_BHWC, ref_BHWC, cutoff: float = 0.25):
  """Sharpness: high-frequency spectral energy of the reconstruction over the reference's.

  Energy at radial frequency > `cutoff` cycles/pixel (Nyquist is 0.5), summed over the
  batch and channels; blurry reconstructions score < 1, faithful ones about 1.
  """
  def hf_energy(x):
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    f = np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2
    fy = np.fft.fftfreq(x.shape[1])[:, None]
    fx = np.fft.fftfreq(x.shape[2])[None, :]
    mask = np.sqrt(fy ** 2 + fx ** 2) > cutoff
    return float((f * mask[None, :, :, None]).sum())
  return hf_energy(rec_BHWC) / max(hf_energy(ref_BHWC), 1e-12)
