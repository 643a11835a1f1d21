"""Torch-exact image resizes as small per-axis matrices (NHWC).

    y_BhwC = resize_bicubic(x_BHWC, (h, w))  # F.interpolate(mode='bicubic')
    y_BhwC = resize_area(x_BHWC, (h, w))     # F.interpolate(mode='area')
    y_BhwC = resize_bilinear(x_BHWC, (h, w))  # F.interpolate(mode='bilinear')
    y_BhwC = resize_bilinear_tf1(x_BHWC, (h, w))  # TF1 ResizeBilinear (the 2015 Inception graph)

The tokenizer's ids depend on these resizes through an argmin, so they must match
PyTorch, which `jax.image.resize` does not (different border rule for cubic, no
overlapping windows for area). Both modes are separable, so each is one (out, in)
matrix per axis, built once in float64 and applied in fp32 at HIGHEST precision
(a TF32/bf16 pass would move ids at near-ties).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # Keys' a, as torch's upsample_bicubic2d


def _keys_weights(t: float) -> tuple[float, float, float, float]:
  """Weights of taps floor(src)-1 .. floor(src)+2 for fractional offset t in [0, 1)."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64: torch bicubic, align_corners=False, no antialias.

  Half-pixel centres src = (i + 0.5) * in/out - 0.5 (not clamped at 0, as torch does
  for cubic), taps beyond the border read the border pixel.
  """
  _check_sizes(in_size, out_size)
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    base = math.floor(src)
    for k, w in enumerate(_keys_weights(src - base)):
      m[i, min(max(base - 1 + k, 0), in_size - 1)] += w
  m.setflags(write=False)  # cached and shared: keep callers from editing it
  return m


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64: adaptive average pooling, window [floor(i*in/out), ceil((i+1)*in/out)).

  Windows overlap when out does not divide in (e.g. 16 -> 13).
  """
  _check_sizes(in_size, out_size)
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # integer ceil
    m[i, start:end] = 1.0 / (end - start)
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64: torch bilinear, align_corners=False, no antialias.

  Half-pixel centres src = (i + 0.5) * in/out - 0.5, clamped at 0 (torch does for linear),
  computed in fp32 as torch does (fp64 coordinates differ by 1e-4 at 300 px).
  """
  _check_sizes(in_size, out_size)
  f = np.float32
  scale = f(in_size) / f(out_size)
  i = np.arange(out_size, dtype=f)
  return _linear_taps(in_size, np.maximum(scale * (i + f(0.5)) - f(0.5), f(0)))


@functools.lru_cache(maxsize=None)
def bilinear_tf1_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64: TF1 ResizeBilinear with align_corners=False, half_pixel_centers=False.

  src = i * in/out (no half-pixel shift): the resize baked into the 2015 Inception graph that
  the ADM evaluator runs, so its features (and ADM's reference statistics) depend on it.
  Coordinates in fp32, as TF computes them.
  """
  _check_sizes(in_size, out_size)
  f = np.float32
  return _linear_taps(in_size, np.arange(out_size, dtype=f) * (f(in_size) / f(out_size)))


def _linear_taps(in_size: int, sources_f32: np.ndarray) -> np.ndarray:
  """Two taps per output row: floor(src) and the next (border-clamped), fp32 fractions."""
  m = np.zeros((len(sources_f32), in_size), np.float64)
  for i, src in enumerate(sources_f32):
    base = min(int(np.floor(src)), in_size - 1)
    t = float(src - np.float32(base))
    m[i, base] += 1.0 - t
    m[i, min(base + 1, in_size - 1)] += t
  m.setflags(write=False)
  return m


def _check_sizes(in_size: int, out_size: int) -> None:
  if in_size < 1 or out_size < 1:
    raise ValueError(f'resize sizes must be >= 1, got {in_size} -> {out_size}')


def _apply(x_BHWC, size: tuple[int, int], matrix_fn) -> jax.Array:
  """Applies matrix_fn(in, out) along H then W; an axis that keeps its size is skipped."""
  if x_BHWC.ndim != 4:
    raise ValueError(f'expected a (B, H, W, C) array, got shape {x_BHWC.shape}')
  h, w = size
  x = jnp.asarray(x_BHWC, jnp.promote_types(x_BHWC.dtype, jnp.float32))
  hp = jax.lax.Precision.HIGHEST
  if x.shape[1] != h:
    m_hH = jnp.asarray(matrix_fn(x.shape[1], h), x.dtype)
    x = jnp.einsum('hH,BHWC->BhWC', m_hH, x, precision=hp)
  if x.shape[2] != w:
    m_wW = jnp.asarray(matrix_fn(x.shape[2], w), x.dtype)
    x = jnp.einsum('wW,BhWC->BhwC', m_wW, x, precision=hp)
  return x


def resize_bicubic(x_BHWC, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C) fp32, as F.interpolate(size=(h, w), mode='bicubic')."""
  return _apply(x_BHWC, size, bicubic_matrix)


def resize_area(x_BHWC, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C) fp32, as F.interpolate(size=(h, w), mode='area')."""
  return _apply(x_BHWC, size, area_matrix)


def resize_bilinear(x_BHWC, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C) fp32, as F.interpolate(size=(h, w), mode='bilinear')."""
  return _apply(x_BHWC, size, bilinear_matrix)


def resize_bilinear_tf1(x_BHWC, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C) fp32, as TF1 tf.image.resize_bilinear (legacy corners)."""
  return _apply(x_BHWC, size, bilinear_tf1_matrix)
