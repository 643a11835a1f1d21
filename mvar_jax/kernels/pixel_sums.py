"""Per-(image, channel) sums and sums of squares of a channels-last map: GroupNorm's
single-pass statistics as one Pallas (Triton) kernel that reads the map once (GPU).

    total_BC, squares_BC = pixel_sums_pallas(x_BHWC)     # fp32 each, x bf16 or fp32

XLA sums over the pixels with the channels minor, a column reduction: on an H100 the bf16
decoder's 256 px pass (8 x 256 x 256 x 160, 84 MB) took 90 us, 0.93 TB/s, and the 128 px
one ran at ~0.6 TB/s (launch/results/h100_2026-11-26.md, call 2 of the second lease).

Here the map of each image is read as rows of ROW = 1024 values. Value f of an image is
channel f mod C, so row r holds the same channels as row r + PERIOD, PERIOD = C /
gcd(C, ROW) rows (5 for the decoder's 160, 320 and 640 channels): a program sums a block
of the rows of one phase (r mod PERIOD) column by column, in fp32, and the PERIOD x ROW
column sums of each image fold into its C channels afterwards (a few kilobytes, in XLA).
Every load is a contiguous 2 KB (bf16) row.

Differentiable (the sums' VJP is elementwise, in XLA), so training may use it; the forward
kernel has no mesh rule of its own: under a mesh it runs once per device on its images
(`per_shard.over_batch`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mvar_jax.kernels import per_shard
from mvar_jax.kernels.neighborhood_attention import pallas_common as pc

ROW = 1024  # values per row the kernel reads
STEP = 8  # rows per load (and per fp32 add) inside a program
MAX_BLOCK_ROWS = 64  # rows of one phase per program: 128 KB of bf16


def period(channels: int) -> int:
  """Rows after which the channel of a row's first value repeats."""
  return channels // math.gcd(channels, ROW)


def block_rows(shape) -> int:
  """Rows of one phase per program for a (B, ..., C) map; 0 if the kernel cannot take it
  (then `pixel_sums` uses XLA)."""
  per_image = math.prod(shape[1:])
  c = shape[-1]
  rows = per_image // (period(c) * ROW)  # per phase
  if per_image % (period(c) * ROW) or rows % STEP:
    return 0
  block = min(MAX_BLOCK_ROWS, rows)
  while rows % block:
    block //= 2
  return block if block % STEP == 0 else 0


def _kernel(x_ref, total_ref, squares_ref, *, rows: int):
  def body(i, acc):
    v = x_ref[pl.ds(i * STEP, STEP), :].astype(jnp.float32)
    return acc[0] + jnp.sum(v, axis=0), acc[1] + jnp.sum(v * v, axis=0)

  zero = jnp.zeros((ROW,), jnp.float32)
  total, squares = jax.lax.fori_loop(0, rows // STEP, body, (zero, zero))
  total_ref[...] = total
  squares_ref[...] = squares


@functools.partial(jax.jit, static_argnames=('num_warps', 'interpret'))
def _column_sums(x_BHWC, *, num_warps: int, interpret: bool):
  """(B, C) fp32 sums and sums of squares over the pixels (shape as `block_rows` accepts)."""
  b, c = x_BHWC.shape[0], x_BHWC.shape[-1]
  per, block = period(c), block_rows(x_BHWC.shape)
  rows = x_BHWC.size // (b * per * ROW)
  # (B, rows, phase, ROW): value f of an image sits at row f // ROW = t * per + phase.
  x = x_BHWC.reshape(b, rows, per, ROW)
  grid = (b, per, rows // block)
  out = jax.ShapeDtypeStruct((b, rows // block, per, ROW), jnp.float32)
  out_spec = pl.BlockSpec((None, None, None, ROW), lambda i, p, g: (i, g, p, 0))
  total, squares = pl.pallas_call(
      functools.partial(_kernel, rows=block),
      grid=grid,
      in_specs=[pl.BlockSpec((None, block, None, ROW), lambda i, p, g: (i, g, p, 0))],
      out_specs=[out_spec, out_spec],
      out_shape=[out, out],
      compiler_params=pc.compiler_params(num_warps, 1),
      interpret=interpret,
      name='pixel_sums',
  )(x)
  # (B, groups, phase, ROW) -> (B, per * ROW) = (B, pixels of a period, C) -> (B, C).
  fold = lambda s: s.sum(axis=1).reshape(b, per * ROW // c, c).sum(axis=1)
  return fold(total), fold(squares)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def pixel_sums_pallas(x_BHWC, num_warps: int = 4, interpret: bool | None = None):
  """(sum, sum of squares) over the pixels per (image, channel): (B, C) fp32 each.

  x: (B, ..., C) with `block_rows(x.shape)` > 0. interpret: Pallas' interpreter (None: the
  MVAR_PALLAS_INTERPRET env var).
  """
  if not block_rows(x_BHWC.shape):
    raise ValueError(f'pixel_sums_pallas: a map of shape {x_BHWC.shape} is not whole rows of '
                     f'{period(x_BHWC.shape[-1])} x {ROW} values per image in blocks of {STEP}')
  sums = functools.partial(_column_sums, num_warps=num_warps,
                           interpret=pc.resolve_interpret(interpret))
  return per_shard.over_batch(sums, x_BHWC)


def _fwd(x_BHWC, num_warps, interpret):
  return pixel_sums_pallas(x_BHWC, num_warps, interpret), x_BHWC


def _bwd(num_warps, interpret, x_BHWC, grads):
  del num_warps, interpret
  g_total, g_squares = grads  # (B, C) each
  expand = lambda g: g.reshape((g.shape[0],) + (1,) * (x_BHWC.ndim - 2) + (g.shape[-1],))
  dx = expand(g_total) + 2.0 * x_BHWC.astype(jnp.float32) * expand(g_squares)
  return (dx.astype(x_BHWC.dtype),)


pixel_sums_pallas.defvjp(_fwd, _bwd)
