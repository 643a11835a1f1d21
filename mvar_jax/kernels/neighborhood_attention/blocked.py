"""Blocked 2D neighbourhood attention in pure JAX: dense matmuls on row bands.

The map's query rows are cut into blocks of `block_rows` rows. Window rows grow with the
query row, so the keys a block can see are one contiguous band of whole key rows
(`MapGeometry.key_block_range`, the band maths the Pallas kernel uses): at most
block_rows + k - 1 rows. Each block attends to its band with ordinary dense matmuls under
the window mask. Against the other two pure-JAX ops:

- gather copies k*k keys and values per query (49x K and V at k = 7);
- dense does N x N work and holds (N, N) logits per head;
- blocked copies each key row about (block_rows + k - 1) / block_rows times and does
  N x band work, holding (block_rows * W, band * W) logits per block and head.

Every band has the same length (bands near the bottom border are shifted up), so the blocks
stack into one batched matmul; the last block is padded with query rows that are dropped.
Where the bands would hold the whole map anyway (small maps, e.g. 13x13 at k = 7) the default
is one block, which is the dense op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.kernels.neighborhood_attention import reference
from mvar_jax.kernels.neighborhood_attention.pallas_common import MapGeometry


def default_block_rows(height: int, width: int, kernel_size: int) -> int:
  """Query rows per block: ~128 queries, and never fewer rows than the window's half; the
  whole map (one block: dense attention) where the bands would not hold fewer keys.

  Chosen from launch/bench_neighborhood_attention.py on CPU (16x16 to 64x64 maps, k = 7):
  smaller blocks waste less of the band on masked keys but copy more key rows. At 13x13
  (k = 7) ~128 queries make two blocks of 10 rows whose bands are the whole map, 20 padded
  rows x 13 key rows against 13 x 13 for the map at once, and the sampler's scale 8 took
  2.1 instead of 1.8 s (d16, batch 2 on 2 cores; launch/results/cpu_2026-11-27_sampling.md).
  """
  rows = int(min(height, max(kernel_size // 2 + 1, -(-128 // width))))
  blocks, band = _blocks_and_band(height, kernel_size, rows)
  return height if blocks * rows * band >= height * height else rows


def _blocks_and_band(height: int, kernel_size: int, rows: int) -> tuple[int, int]:
  """(blocks of `rows` query rows, key rows in each block's band) for a map `height` rows high."""
  return -(-height // rows), min(rows + kernel_size - 1, height)


@functools.lru_cache(maxsize=None)
def band_plan(height: int, width: int, kernel_size: int, block_rows: int):
  """(first key row of each block's band (nb,), band rows, mask (nb, rows*W, band*W) bool)."""
  reference.validate(height, width, kernel_size)
  if block_rows < 1:
    raise ValueError(f'block_rows must be >= 1, got {block_rows}')
  r = min(block_rows, height)
  nb, band = _blocks_and_band(height, kernel_size, r)
  geom = MapGeometry(height, width, kernel_size)
  lo = np.empty(nb, np.int64)
  for i in range(nb):  # key rows [lo, hi) that query rows [i*r, i*r + r) can see
    with jax.ensure_compile_time_eval():  # plain ints even when first called under a jit
      row_lo, row_hi = (int(x) for x in geom.key_block_range(i, r * width, width))
    assert row_hi - row_lo <= band, (row_lo, row_hi, band)
    lo[i] = min(row_lo, height - band)  # one band length for all: shift up at the border
  starts_row = reference.window_starts(height, kernel_size)
  starts_col = reference.window_starts(width, kernel_size)
  q_rows = np.minimum(np.arange(nb)[:, None] * r + np.arange(r)[None], height - 1)  # (nb, r)
  rel = starts_row[q_rows] - lo[:, None]  # window's first row inside the band
  band_rows = np.arange(band)
  row_ok = (band_rows >= rel[..., None]) & (band_rows < rel[..., None] + kernel_size)
  cols = np.arange(width)
  col_ok = (cols[None] >= starts_col[:, None]) & (cols[None] < starts_col[:, None] + kernel_size)
  mask = row_ok[:, :, None, :, None] & col_ok[None, None, :, None, :]  # (nb, r, W, band, W)
  return lo, band, mask.reshape(nb, r * width, band * width)


def na2d_blocked(q_BNHD, k_BNHD, v_BNHD, *, height: int, width: int, kernel_size: int,
                 scale: float | None = None, block_rows: int | None = None):
  """Neighbourhood attention on row bands. Returns (B, N, heads, D) in q's dtype."""
  reference._check_shapes(q_BNHD, k_BNHD, v_BNHD, height, width)
  block_rows = block_rows or default_block_rows(height, width, kernel_size)
  if block_rows >= height:  # one block, its band the whole map: the dense op, without copies
    return reference.na2d_dense(q_BNHD, k_BNHD, v_BNHD, height=height, width=width,
                                kernel_size=kernel_size, scale=scale)
  lo, band, mask = band_plan(height, width, kernel_size, block_rows)
  nb, bq, _ = mask.shape
  scale = q_BNHD.shape[-1] ** -0.5 if scale is None else scale
  b, n, h, d = q_BNHD.shape
  q_BnQHD = jnp.pad(q_BNHD, ((0, 0), (0, nb * bq - n), (0, 0), (0, 0))).reshape(b, nb, bq, h, d)
  bands = lambda x: jnp.stack([x[:, s * width:(s + band) * width] for s in lo], axis=1)
  k_BnKHD, v_BnKHD = bands(k_BNHD), bands(v_BNHD)
  logits = jnp.einsum('bnqhd,bnkhd->bnhqk', q_BnQHD, k_BnKHD,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[None, :, None], logits, reference._MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bnhqk,bnkhd->bnqhd', probs.astype(v_BNHD.dtype), v_BnKHD,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, nb * bq, h, d)[:, :n].astype(q_BNHD.dtype)
