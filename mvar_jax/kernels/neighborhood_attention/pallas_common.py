"""Shared pieces of the Pallas neighbourhood-attention kernels: tiles, geometry, launch knobs.

The geometry helpers work on Python ints, numpy arrays and traced int32 scalars or vectors
alike, so the kernels, the wrapper and the tests all use the same window rule.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Finite: a tile row with every key masked must give exp2(MASK - MASK) = 1 (wiped later by
# the online-softmax correction), never -inf - -inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
INTERPRET_ENV = 'MVAR_PALLAS_INTERPRET'
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (rows of the raster-ordered map) and Triton launch knobs for the three kernels.

  Every block is a power of two >= 16 (Triton's tl.dot needs >= 16 per side and Triton
  tensors must have power-of-two sizes); N need not be a multiple: tails are masked.
  """
  block_q: int = 64       # forward: query rows per program
  block_k: int = 64       # forward: key rows per inner step
  block_q_dq: int = 64    # dQ kernel: query rows per program
  block_k_dq: int = 64    # dQ kernel: key rows per inner step
  block_q_dkv: int = 64   # dK/dV kernel: query rows per inner step
  block_k_dkv: int = 64   # dK/dV kernel: key rows per program
  num_warps: int = 4      # forward
  num_stages: int = 2     # forward software-pipelining depth
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  @classmethod
  def get_default(cls, head_dim: int, dtype) -> 'BlockSizes':
    """Starting points that compile without register spills for sm_90 (ptxas -v, Triton 3.9).

    Not tuned on a GPU yet: launch/bench_neighborhood_attention.py --pallas_configs does that.
    """
    if jnp.dtype(dtype) == jnp.float32:
      # IEEE fp32 dots run on FMA units; 64-row tiles spill (1-27 KB of local memory).
      return cls(block_q=32, block_k=32, block_q_dq=32, block_k_dq=32, block_q_dkv=32,
                 block_k_dkv=32)
    if head_dim >= 128:
      return cls(num_warps_bwd=8)  # two (64, 128) fp32 accumulators spill with 4 warps
    return cls()

  def validate(self) -> None:
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name.startswith('block_') and not (_is_pow2(value) and value >= 16):
        raise ValueError(f'BlockSizes.{f.name} must be a power of two >= 16, got {value}')
      if f.name.startswith('num_warps') and not _is_pow2(value):
        raise ValueError(f'BlockSizes.{f.name} must be a power of two, got {value}')
      if f.name.startswith('num_stages') and value < 1:
        raise ValueError(f'BlockSizes.{f.name} must be >= 1, got {value}')

  def fit(self, n: int) -> 'BlockSizes':
    """Shrinks blocks larger than next_pow2(n) (they would only add masked rows)."""
    cap = max(16, next_pow2(n))
    return dataclasses.replace(self, **{
        f.name: min(getattr(self, f.name), cap)
        for f in dataclasses.fields(self) if f.name.startswith('block_')})


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler params (CompilerParams in current JAX, TritonCompilerParams in older)."""
  cls = getattr(plgpu, 'CompilerParams', None) or getattr(plgpu, 'TritonCompilerParams')
  return cls(num_warps=num_warps, num_stages=num_stages)


def resolve_interpret(interpret: bool | None) -> bool:
  """Explicit argument wins; else the MVAR_PALLAS_INTERPRET env var (1/true/yes)."""
  if interpret is not None:
    return bool(interpret)
  return os.environ.get(INTERPRET_ENV, '').strip().lower() in ('1', 'true', 'yes')


def dot(a, b, *, trans_b: bool = False, precision=None):
  """a @ b (or a @ b.T) with fp32 accumulation; lowers to one tl.dot under Triton."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def dot_precision(dtype):
  # Triton treats DEFAULT fp32 dots as tf32; HIGHEST asks for IEEE fp32 (the tests' 1e-5).
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ---------------------------------------------------------------------------------------------
# Geometry. Per axis the window of position i starts at clamp(i - k//2, 0, n - k) (NATTEN).
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MapGeometry:
  """A height x width map in raster order with a k x k neighbourhood window."""
  height: int
  width: int
  kernel_size: int

  @property
  def n(self) -> int:
    return self.height * self.width

  def _start(self, i, n):
    return jnp.minimum(jnp.maximum(i - self.kernel_size // 2, 0), n - self.kernel_size)

  def window_lo(self, q_idx):
    """First window row and column for raster query indices (any int shape)."""
    row, col = lax.div(q_idx, self.width), lax.rem(q_idx, self.width)
    return self._start(row, self.height), self._start(col, self.width)

  def in_window(self, row_lo, col_lo, k_idx):
    """Bool, broadcast of (row_lo, col_lo) against raster key indices k_idx.

    Keys past the map (k_idx >= N, tile tails) have row >= height > row_lo + k - 1, so they
    are masked without an extra test.
    """
    dr = lax.div(k_idx, self.width) - row_lo
    dc = lax.rem(k_idx, self.width) - col_lo
    k = self.kernel_size
    return (dr >= 0) & (dr < k) & (dc >= 0) & (dc < k)

  def key_block_range(self, q_block, block_q: int, block_k: int):
    """[lo, hi) key blocks that queries [q_block*block_q, +block_q) can see.

    Window rows are monotone in the query row, so the keys form one contiguous raster band:
    from the first query row's window start to the last query row's window end.
    """
    q0 = q_block * block_q
    first_row = lax.div(q0, self.width)
    last_row = jnp.minimum(lax.div(q0 + block_q - 1, self.width), self.height - 1)
    lo = self._start(first_row, self.height) * self.width
    hi = (self._start(last_row, self.height) + self.kernel_size) * self.width
    return lax.div(lo, block_k), lax.div(hi + block_k - 1, block_k)

  def query_block_range(self, k_block, block_q: int, block_k: int):
    """[lo, hi) query blocks whose windows can include keys [k_block*block_k, +block_k).

    Inverse of the window rule along rows (h = k//2): key row r is seen by query rows
    [0 if r < k else r - h, height-1 if r >= height - k else r + h].
    """
    h, k = self.kernel_size // 2, self.kernel_size
    k0 = k_block * block_k
    first_row = lax.div(k0, self.width)
    last_row = jnp.minimum(lax.div(k0 + block_k - 1, self.width), self.height - 1)
    q_row_lo = jnp.where(first_row < k, 0, first_row - h)
    q_row_hi = jnp.where(last_row >= self.height - k, self.height - 1, last_row + h)
    lo = q_row_lo * self.width
    hi = (q_row_hi + 1) * self.width
    return lax.div(lo, block_q), lax.div(hi + block_q - 1, block_q)


def iota(start, size: int):
  """(size,) int32 raster indices start, start+1, ..."""
  return start + jnp.arange(size, dtype=jnp.int32)


def load_rows(ref, start, size: int, n: int):
  """(size, D) rows [start, start+size) of a (N, D) ref; rows >= n read as 0 (never NaN)."""
  valid = iota(start, size) < n
  return plgpu.load(ref.at[pl.ds(start, size), :], mask=valid[:, None], other=0.0)


def load_vec(ref, start, size: int, n: int):
  """(size,) entries [start, start+size) of a (N,) ref; entries >= n read as 0."""
  valid = iota(start, size) < n
  return plgpu.load(ref.at[pl.ds(start, size)], mask=valid, other=0.0)


def store_rows(ref, start, value, n: int):
  valid = iota(start, value.shape[0]) < n
  plgpu.store(ref.at[pl.ds(start, value.shape[0]), :], value.astype(ref.dtype),
              mask=valid[:, None])


def store_vec(ref, start, value, n: int):
  valid = iota(start, value.shape[0]) < n
  plgpu.store(ref.at[pl.ds(start, value.shape[0])], value.astype(ref.dtype), mask=valid)


def check_inputs(q, k, v, geom: MapGeometry) -> None:
  """Shape/dtype checks the kernels rely on, raised before tracing a kernel."""
  if not (q.shape == k.shape == v.shape):
    raise ValueError(f'q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}')
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f'q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}')
  if q.ndim != 4 or q.shape[1] != geom.n:
    raise ValueError(f'expected (B, {geom.n}, heads, D) for a {geom.height}x{geom.width} map, '
                     f'got {q.shape}')
  if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise ValueError(f'dtype must be one of float32/bfloat16/float16, got {q.dtype}')
  head_dim = q.shape[-1]
  if not (_is_pow2(head_dim) and head_dim >= 16):
    raise ValueError(f'head dim must be a power of two >= 16 for the Pallas kernel, got {head_dim}')


def supports(head_dim: int, dtype) -> bool:
  """Whether the Pallas kernel handles this head dim and dtype ('auto' falls back otherwise)."""
  return (_is_pow2(head_dim) and head_dim >= 16
          and jnp.dtype(dtype) in [jnp.dtype(d) for d in SUPPORTED_DTYPES])

