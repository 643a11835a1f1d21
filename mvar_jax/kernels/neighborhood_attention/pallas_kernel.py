"""Fused 2D neighbourhood attention in Pallas (NATTEN semantics), forward and backward.

  out_BNHD = na2d_pallas(q, k, v, height=13, width=13, kernel_size=7, scale=0.125)

Semantics match `reference.na2d_gather`: raster-ordered (B, N, heads, D) maps, odd kernel,
dilation 1, windows clamped inside the map, no positional bias; fp32/bf16/fp16 inputs with
fp32 softmax and accumulation; D a power of two >= 16.

Design.
- Grid (row blocks, batch, heads); each program gets the whole (N, D) map of its batch and
  head and slices its tiles itself. Window rows are monotone in the query row, so the keys a
  block of query rows needs are one contiguous raster band (first row's window start to the
  last row's window end): the forward and dQ kernels loop over that band's key blocks only,
  bounds from scalar integer math on program_id (`MapGeometry.key_block_range`), and mask
  inside each tile with the exact window test. Cost is O(N * band), not O(N^2).
- Forward: online softmax in base 2 (FlashAttention-2), saves lse (B, heads, N) fp32.
- Backward: a dQ kernel over query blocks (it also writes delta = rowsum(dO * O), fused since
  it reads O and dO anyway), then a dK/dV kernel over key blocks that loops over the query
  blocks that can see it (`query_block_range`, the inverse window rule). No atomics: each
  program owns its output rows, so gradients are deterministic.
- Masked scores use a large finite value, never -inf, so fully masked tile rows cannot make
  NaN. N need not be a multiple of the blocks: tiles are power-of-two (Triton needs that) and
  the tail is handled by masked loads (as 0) and masked stores, instead of padding copies of
  q, k, v in HBM (a 13x13 map would otherwise pay for 192 or 256 rows twice).

Why Triton, not Mosaic GPU: the Triton lowering runs on every CUDA GPU JAX supports (and
ROCm), is what `jax.experimental.pallas.ops.gpu.attention` uses, and its API (`plgpu.load`
with masks, `CompilerParams(num_warps, num_stages)`) has been stable across the JAX versions
we run (0.10 on CPU, 0.11 on GPU). Mosaic GPU is Hopper/Blackwell-only, its API still moves
between releases, and its gains (TMA, wgmma warp specialisation) matter for long dense
sequences, not for bands of a few hundred keys at D=64.

`na2d_pallas_from_qkv` (inference) runs the forward kernel on the model's qkv projection
(B, N, 3, heads, D): it l2-normalises q (times the head's scale) and k rows as it loads them,
so XLA writes no q, k, v copies first; with kernel_size None the window is the whole map,
which is dense attention over a scale (MVAR's small scales).

`interpret=True` (or env MVAR_PALLAS_INTERPRET=1) runs the same kernels on CPU for tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mvar_jax.kernels.neighborhood_attention import pallas_backward
from mvar_jax.kernels.neighborhood_attention import pallas_common as pc
from mvar_jax.kernels.neighborhood_attention import pallas_forward
from mvar_jax.kernels import per_shard
from mvar_jax.kernels.neighborhood_attention import reference
from mvar_jax.kernels.neighborhood_attention.pallas_common import BlockSizes, supports

__all__ = ['BlockSizes', 'na2d_pallas', 'na2d_pallas_from_qkv', 'supports']


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels are specialised on (hashable: a custom_vjp nondiff argument)."""
  geom: pc.MapGeometry
  scale: float
  block_sizes: BlockSizes
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _na2d(q_BNHD, k_BNHD, v_BNHD, static: _Static):
  out_BNHD, _ = _forward(q_BNHD, k_BNHD, v_BNHD, static)
  return out_BNHD


def _forward(q_BNHD, k_BNHD, v_BNHD, static: _Static):
  return pallas_forward.forward(q_BNHD, k_BNHD, v_BNHD, geom=static.geom, scale=static.scale,
                                block_sizes=static.block_sizes, interpret=static.interpret)


def _na2d_fwd(q_BNHD, k_BNHD, v_BNHD, static: _Static):
  out_BNHD, lse_BHN = _forward(q_BNHD, k_BNHD, v_BNHD, static)
  return out_BNHD, (q_BNHD, k_BNHD, v_BNHD, out_BNHD, lse_BHN)


def _na2d_bwd(static: _Static, residuals, dout_BNHD):
  q_BNHD, k_BNHD, v_BNHD, out_BNHD, lse_BHN = residuals
  return pallas_backward.backward(
      q_BNHD, k_BNHD, v_BNHD, out_BNHD, lse_BHN, dout_BNHD.astype(out_BNHD.dtype),
      geom=static.geom, scale=static.scale, block_sizes=static.block_sizes,
      interpret=static.interpret)


_na2d.defvjp(_na2d_fwd, _na2d_bwd)


def na2d_pallas(q_BNHD, k_BNHD, v_BNHD, *, height: int, width: int, kernel_size: int,
                scale: float | None = None, block_sizes: BlockSizes | None = None,
                interpret: bool | None = None):
  """Neighbourhood attention, fused Pallas kernels. (B, N, heads, D) -> same, q's dtype.

  block_sizes: tiles and Triton knobs (default `BlockSizes.get_default`, shrunk to the map).
  interpret: run on CPU through the Pallas interpreter; None reads MVAR_PALLAS_INTERPRET.
  """
  reference.validate(height, width, kernel_size)
  geom = pc.MapGeometry(height, width, kernel_size)
  pc.check_inputs(q_BNHD, k_BNHD, v_BNHD, geom)
  block_sizes = block_sizes or BlockSizes.get_default(q_BNHD.shape[-1], q_BNHD.dtype)
  block_sizes.validate()
  block_sizes = block_sizes.fit(geom.n)
  scale = q_BNHD.shape[-1] ** -0.5 if scale is None else float(scale)
  static = _Static(geom, scale, block_sizes, pc.resolve_interpret(interpret))
  # Under a mesh: once per device on its rows of the batch (XLA cannot split the kernel).
  return per_shard.over_batch(lambda q, k, v: _na2d(q, k, v, static), q_BNHD, k_BNHD, v_BNHD)


def na2d_pallas_from_qkv(qkv_BN3HD, head_scale_H, *, height: int, width: int,
                         kernel_size: int | None, scale: float = 1.0, bias_3HD=None,
                         block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Inference only (no VJP): the model's attention from its qkv projection; under a mesh,
  once per device on its rows of the batch (`per_shard.over_batch`).

  With x = qkv + bias_3HD (zeros when None; rounded to qkv's dtype), equals
  `na2d_pallas(q, k, v)` with q = l2n(x[:, :, 0]) * head_scale and k = l2n(x[:, :, 1])
  rounded to qkv's dtype, v = x[:, :, 2] (l2n: rows over their l2 norm). (B, N, heads, D).
  kernel_size None: every query sees the whole (square) map, i.e. dense attention over it
  (a window as large as the map starts at 0 for every query, whatever its parity).
  """
  if kernel_size is None:
    if height != width or height < 1:
      raise ValueError(f'na2d_pallas_from_qkv: whole-map attention needs a square map, got '
                       f'{height}x{width}')
    kernel_size = height
  else:
    reference.validate(height, width, kernel_size)
  geom = pc.MapGeometry(height, width, kernel_size)
  b, n, three, heads, head_dim = qkv_BN3HD.shape
  if three != 3 or n != geom.n or head_scale_H.shape != (heads,):
    raise ValueError(f'na2d_pallas_from_qkv: qkv {qkv_BN3HD.shape} must be (B, {geom.n}, 3, '
                     f'heads, D) and head_scale {head_scale_H.shape} (heads,)')
  if not supports(head_dim, qkv_BN3HD.dtype):
    raise ValueError(f'na2d_pallas_from_qkv: head dim {head_dim} / {qkv_BN3HD.dtype} unsupported')
  if bias_3HD is None:
    bias_3HD = jnp.zeros((3, heads, head_dim), qkv_BN3HD.dtype)
  elif bias_3HD.shape != (3, heads, head_dim):
    raise ValueError(f'na2d_pallas_from_qkv: bias {bias_3HD.shape} must be (3, {heads}, '
                     f'{head_dim})')
  block_sizes = block_sizes or BlockSizes.get_default(head_dim, qkv_BN3HD.dtype)
  block_sizes.validate()
  forward = functools.partial(pallas_forward.forward_from_qkv, geom=geom, scale=float(scale),
                              block_sizes=block_sizes.fit(n),
                              interpret=pc.resolve_interpret(interpret))
  # Under a mesh: once per device on its maps; the head scales and the bias whole on each.
  return per_shard.over_batch(forward, qkv_BN3HD,
                              shared=(head_scale_H, bias_3HD.astype(qkv_BN3HD.dtype)))
