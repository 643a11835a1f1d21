"""Built-in class-conditional dataset: coloured shapes on a grey background.

Nothing is downloaded: every image is rendered with numpy from its own seed. A class is one
(shape, hue) pair, so both cues separate the classes even at 32 px; size, position, a little
colour jitter and the background shade vary inside a class, which gives a generative model
something to learn while keeping the class recognisable. Example `i` of seed `s` is the same
image whatever `num_examples` is, so splits are disjoint by seed (or by index range).
"""

from __future__ import annotations

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'cross', 'ring', 'diamond', 'frame', 'x', 'stripes',
          'half-disc')
HUE_NAMES = ('red', 'orange', 'yellow', 'lime', 'green', 'cyan', 'azure', 'blue', 'violet',
             'magenta')
# Hues 36 degrees apart; the jitter below stays well inside half of that.
HUES_DEG = tuple(36.0 * i for i in range(len(HUE_NAMES)))
MAX_CLASSES = len(SHAPES) * len(HUE_NAMES)

_HUE_JITTER_DEG = 6.0
_RADIUS_RANGE = (0.25, 0.40)  # half-extent of a shape, as a fraction of the image side
_CHUNK = 512  # images rendered at once; bounds the (n, H, W) float temporaries


def class_spec(label: int) -> tuple[int, int]:
  """(shape index, hue index) of a class; the first 10 classes use 10 shapes and 10 hues."""
  if not 0 <= label < MAX_CLASSES:
    raise ValueError(f'label must be in [0, {MAX_CLASSES}), got {label}')
  shape = label % len(SHAPES)
  # Classes 10.. reuse the shapes with shifted hues, so every (shape, hue) pair is used once.
  hue = (shape + label // len(SHAPES)) % len(HUE_NAMES)
  return shape, hue


def class_names(num_classes: int = 10) -> list[str]:
  """Human-readable names, e.g. 'red circle', for classes 0..num_classes-1."""
  _check_num_classes(num_classes)
  names = []
  for label in range(num_classes):
    shape, hue = class_spec(label)
    names.append(f'{HUE_NAMES[hue]} {SHAPES[shape]}')
  return names


def labels_for(indices: np.ndarray, *, num_classes: int = 10, seed: int = 0) -> np.ndarray:
  """(n,) int32 labels of examples `indices`; every aligned run of num_classes indices holds each
  class exactly once, so any split of a few hundred examples is balanced."""
  indices = np.asarray(indices, np.int64)
  labels = np.empty(indices.shape, np.int32)
  perms = {}
  for j, idx in enumerate(indices.tolist()):
    block = idx // num_classes
    if block not in perms:
      perms[block] = np.random.default_rng([seed, block, 1]).permutation(num_classes)
    labels[j] = perms[block][idx % num_classes]
  return labels


def generate(num_examples: int, *, image_size: int = 32, num_classes: int = 10, seed: int = 0,
             start: int = 0, antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Examples start..start+num_examples-1 of seed `seed`.

  Returns (images uint8 (N, H, W, 3) with H = W = image_size, labels int32 (N,)).
  """
  _check_num_classes(num_classes)
  if not 8 <= image_size <= 512:
    raise ValueError(f'image_size must be in [8, 512] (the classes are designed for 32..64), '
                     f'got {image_size}')
  if num_examples < 0 or start < 0 or seed < 0:
    raise ValueError(f'num_examples, start and seed must be >= 0, got {num_examples}, {start}, '
                     f'{seed}')
  indices = np.arange(start, start + num_examples, dtype=np.int64)
  labels = labels_for(indices, num_classes=num_classes, seed=seed)
  # 8 uniforms per example from the example's own stream: determinism per (index, seed).
  u_N8 = np.stack([np.random.default_rng([seed, int(i), 0]).random(8) for i in indices]) \
      if num_examples else np.zeros((0, 8))
  images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
  for lo in range(0, num_examples, _CHUNK):
    hi = min(lo + _CHUNK, num_examples)
    images[lo:hi] = _render(labels[lo:hi], u_N8[lo:hi], image_size, antialias)
  return images, labels


def _check_num_classes(num_classes: int):
  if not 1 <= num_classes <= MAX_CLASSES:
    raise ValueError(f'num_classes must be in [1, {MAX_CLASSES}], got {num_classes}')


def _render(labels_N, u_N8, size: int, antialias: bool) -> np.ndarray:
  """uint8 (N, size, size, 3) images from labels and per-example uniforms."""
  n = len(labels_N)
  r_N = size * (_RADIUS_RANGE[0] + (_RADIUS_RANGE[1] - _RADIUS_RANGE[0]) * u_N8[:, 0])
  # Keep the whole shape (extent r) plus a 1 px margin inside the frame.
  lo_N, hi_N = r_N + 1.0, size - 1.0 - r_N
  cx_N = lo_N + (hi_N - lo_N) * u_N8[:, 1]
  cy_N = lo_N + (hi_N - lo_N) * u_N8[:, 2]
  spec = np.array([class_spec(int(l)) for l in labels_N], np.int32).reshape(n, 2)
  hue_N = (np.asarray(HUES_DEG)[spec[:, 1]] + _HUE_JITTER_DEG * (2 * u_N8[:, 3] - 1)) % 360
  fg_N3 = _hsv_to_rgb(hue_N, 0.7 + 0.3 * u_N8[:, 4], 0.75 + 0.25 * u_N8[:, 5])
  bg_N = 0.05 + 0.30 * u_N8[:, 6]
  # A gentle left-to-right gradient so the background is not one flat value.
  tilt_N = 0.06 * (2 * u_N8[:, 7] - 1)

  centres = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
  gx_NHW = centres[None, None, :] - cx_N[:, None, None]
  gy_NHW = centres[None, :, None] - cy_N[:, None, None]
  gx_NHW, gy_NHW = np.broadcast_arrays(gx_NHW, gy_NHW)
  sdf_NHW = np.empty((n, size, size))
  for s in np.unique(spec[:, 0]):
    m = spec[:, 0] == s
    sdf_NHW[m] = _SDF[SHAPES[s]](gx_NHW[m], gy_NHW[m], r_N[m][:, None, None])
  # Signed distance to coverage: a one-pixel ramp is a cheap, good anti-alias at these sizes.
  cover_NHW = np.clip(0.5 - sdf_NHW, 0.0, 1.0) if antialias else (sdf_NHW <= 0).astype(np.float64)
  bg_NHW = bg_N[:, None, None] + tilt_N[:, None, None] * (centres[None, None, :] / size - 0.5)
  img_NHW3 = (bg_NHW[..., None] * (1 - cover_NHW[..., None])
              + fg_N3[:, None, None, :] * cover_NHW[..., None])
  return np.clip(np.round(img_NHW3 * 255), 0, 255).astype(np.uint8)


def _hsv_to_rgb(h_deg, s, v):
  """(N,) hue in degrees, saturation, value in [0, 1] -> (N, 3) RGB in [0, 1]."""
  k_N3 = (np.asarray([5.0, 3.0, 1.0])[None, :] + h_deg[:, None] / 60.0) % 6
  return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k_N3, 4 - k_N3), 0, 1)


# Signed distance functions (negative inside, in pixels) of shapes of half-extent r at the origin.
def _box(x, y, hx, hy):
  qx, qy = np.abs(x) - hx, np.abs(y) - hy
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0)


def _circle(x, y, r):
  return np.hypot(x, y) - r


def _square(x, y, r):
  return _box(x, y, 0.85 * r, 0.85 * r)


def _triangle(x, y, r):
  # Apex (0, -r), base corners (+-r, 0.8 r). The max of the edge half-plane distances is exact
  # inside and close enough outside for a one-pixel anti-alias ramp.
  nx, ny = 1.8, -1.0  # outward normal of the right edge, whose direction is (1, 1.8)
  side = (np.abs(x) * nx + (y + r) * ny) / np.hypot(nx, ny)
  return np.maximum(side, y - 0.8 * r)


def _cross(x, y, r):
  return np.minimum(_box(x, y, r, 0.3 * r), _box(x, y, 0.3 * r, r))


def _ring(x, y, r):
  return np.abs(np.hypot(x, y) - 0.72 * r) - 0.28 * r


def _diamond(x, y, r):
  return (np.abs(x) + np.abs(y) - r) / np.sqrt(2.0)


def _frame(x, y, r):
  return np.maximum(_box(x, y, 0.85 * r, 0.85 * r), -_box(x, y, 0.45 * r, 0.45 * r))


def _x(x, y, r):
  c = np.sqrt(0.5)
  u, v = c * (x + y), c * (y - x)
  return np.minimum(_box(u, v, r, 0.24 * r), _box(u, v, 0.24 * r, r))


def _stripes(x, y, r):
  bars = [_box(x, y - dy * r, 0.9 * r, 0.18 * r) for dy in (-0.66, 0.0, 0.66)]
  return np.minimum(np.minimum(bars[0], bars[1]), bars[2])


def _half_disc(x, y, r):
  # Upper half of a disc whose flat edge sits 0.3 r below the centre of the frame.
  return np.maximum(np.hypot(x, y - 0.3 * r) - r, y - 0.3 * r)


_SDF = {'circle': _circle, 'square': _square, 'triangle': _triangle, 'cross': _cross,
        'ring': _ring, 'diamond': _diamond, 'frame': _frame, 'x': _x, 'stripes': _stripes,
        'half-disc': _half_disc}
