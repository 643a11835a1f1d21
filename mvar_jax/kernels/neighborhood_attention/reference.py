"""Pure-JAX 2D neighbourhood attention (NATTEN semantics), two ways.

Queries, keys and values are maps stored in raster order as (B, N, heads, D) with
N = height * width. Query (i, j) attends to the k x k window whose top-left corner
is (clamp(i - k//2, 0, height - k), clamp(j - k//2, 0, width - k)): near a border
the window is shifted inside the map, never padded, so every query sees k*k keys.
Dilation 1, no positional bias.

- `na2d_gather`: gathers each query's k*k keys and values (O(N k^2) compute, but
  k^2 copies of K and V in memory). The reference the kernels are tested against.
- `na2d_dense`: full (N, N) attention with a neighbourhood mask (O(N^2) compute,
  no copies). Same function, different cost profile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so that a fully masked row could never produce NaN (-inf - -inf).
_MASK_VALUE = -1e30


def validate(height: int, width: int, kernel_size: int) -> None:
  """Raises ValueError unless a k x k window fits an odd kernel inside the map."""
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f'kernel_size must be a positive odd integer, got {kernel_size}')
  if kernel_size > height or kernel_size > width:
    raise ValueError(
        f'kernel_size {kernel_size} is larger than the {height}x{width} map; '
        'neighbourhood attention needs kernel_size <= min(height, width)')


def window_starts(n: int, kernel_size: int) -> np.ndarray:
  """(n,) first row (or column) of each position's window along one axis."""
  return np.clip(np.arange(n) - kernel_size // 2, 0, n - kernel_size)


@functools.lru_cache(maxsize=None)
def neighbor_indices(height: int, width: int, kernel_size: int) -> np.ndarray:
  """(N, k*k) int32 raster index of every query's keys, window rows then columns."""
  validate(height, width, kernel_size)
  r0 = window_starts(height, kernel_size)
  c0 = window_starts(width, kernel_size)
  offs = np.arange(kernel_size)
  rows = r0[:, None, None, None] + offs[None, None, :, None]  # (H, 1, k, 1)
  cols = c0[None, :, None, None] + offs[None, None, None, :]  # (1, W, 1, k)
  idx = rows * width + cols  # (H, W, k, k)
  return idx.reshape(height * width, kernel_size * kernel_size).astype(np.int32)


@functools.lru_cache(maxsize=None)
def neighbor_mask(height: int, width: int, kernel_size: int) -> np.ndarray:
  """(N, N) bool: mask[q, k] is True where key k is in query q's window."""
  idx = neighbor_indices(height, width, kernel_size)
  n = height * width
  mask = np.zeros((n, n), dtype=bool)
  mask[np.arange(n)[:, None], idx] = True
  return mask


def _check_shapes(q, k, v, height, width):
  if not (q.shape == k.shape == v.shape):
    raise ValueError(f'q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}')
  if q.ndim != 4 or q.shape[1] != height * width:
    raise ValueError(f'expected (B, {height * width}, heads, D) for a {height}x{width} map, got {q.shape}')


def na2d_gather(q_BNHD, k_BNHD, v_BNHD, *, height: int, width: int, kernel_size: int,
                scale: float | None = None):
  """Neighbourhood attention by gathered windows. Returns (B, N, heads, D) in q's dtype."""
  _check_shapes(q_BNHD, k_BNHD, v_BNHD, height, width)
  scale = q_BNHD.shape[-1] ** -0.5 if scale is None else scale
  idx_NT = jnp.asarray(neighbor_indices(height, width, kernel_size))
  k_BNTHD = k_BNHD[:, idx_NT]
  v_BNTHD = v_BNHD[:, idx_NT]
  logits_BNHT = jnp.einsum('bnhd,bnthd->bnht', q_BNHD, k_BNTHD,
                           preferred_element_type=jnp.float32) * scale
  probs_BNHT = jax.nn.softmax(logits_BNHT, axis=-1)
  out = jnp.einsum('bnht,bnthd->bnhd', probs_BNHT.astype(v_BNHD.dtype), v_BNTHD,
                   preferred_element_type=jnp.float32)
  return out.astype(q_BNHD.dtype)


def na2d_dense(q_BNHD, k_BNHD, v_BNHD, *, height: int, width: int, kernel_size: int,
               scale: float | None = None):
  """Neighbourhood attention as dense attention under a (N, N) mask. (B, N, heads, D)."""
  _check_shapes(q_BNHD, k_BNHD, v_BNHD, height, width)
  mask_NN = jnp.asarray(neighbor_mask(height, width, kernel_size))
  return masked_dense_attention(q_BNHD, k_BNHD, v_BNHD, mask_NN, scale=scale)


def masked_dense_attention(q_BQHD, k_BKHD, v_BKHD, mask_QK=None, *, scale: float | None = None):
  """Softmax attention with an optional boolean (Q, K) mask; fp32 logits. (B, Q, heads, D)."""
  scale = q_BQHD.shape[-1] ** -0.5 if scale is None else scale
  logits_BHQK = jnp.einsum('bqhd,bkhd->bhqk', q_BQHD, k_BKHD,
                           preferred_element_type=jnp.float32) * scale
  if mask_QK is not None:
    logits_BHQK = jnp.where(mask_QK, logits_BHQK, _MASK_VALUE)
  probs_BHQK = jax.nn.softmax(logits_BHQK, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs_BHQK.astype(v_BKHD.dtype), v_BKHD,
                   preferred_element_type=jnp.float32)
  return out.astype(q_BQHD.dtype)
