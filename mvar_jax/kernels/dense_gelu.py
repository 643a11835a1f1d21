"""fc1 of the FFN with its bias and tanh-GELU in the matmul's epilogue: one Pallas kernel (GPU).

    h_MN = dense_gelu_pallas(x_MK, w_KN, b_N)     # gelu(x @ w + b), in x's dtype

XLA runs fc1 as a cuBLAS matmul that writes the (tokens, 4C) hidden activation, then a fusion
that reads it back, applies the bias and GELU and writes it again: two more passes over the
largest activation of a block (268 MB per block at the sampler's last scale, d16 batch 32
with CFG). Here each (block_m, block_n) tile accumulates x @ w in fp32 and applies the bias
and GELU before its one store.

Opt-in (`TransformerConfig.ffn_implementation='pallas'`), not the default: on an H100 the
Triton matmul ran at ~60% of cuBLAS's rate, which cost more than the GELU pass it saves
(per scale and tile: launch/bench_fusions.py --parts=gelu; launch/results/h100_2026-11-26.md).

Inference only (no VJP): the sampler's forward. Numerics: fp32 accumulation, bias and GELU
in fp32, one rounding to x's dtype at the end (XLA rounds the matmul output to bf16 first),
so bf16 results differ from XLA's by bf16 rounding of the pre-activation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mvar_jax.kernels import per_shard
from mvar_jax.kernels.neighborhood_attention import pallas_common as pc

_SQRT_2_OVER_PI = 0.7978845608028654


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Output tile (block_m x block_n), reduction step block_k, Triton launch knobs."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3

  def validate(self) -> None:
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name.startswith('block_') and not (pc._is_pow2(v) and v >= 16):
        raise ValueError(f'Tiles.{f.name} must be a power of two >= 16, got {v}')
    if not pc._is_pow2(self.num_warps) or self.num_stages < 1:
      raise ValueError(f'Tiles: num_warps must be a power of two and num_stages >= 1: {self}')

  def fit(self, m: int) -> 'Tiles':
    """block_m halved (down to 16) until it divides m, so that no rows are padded: a pad
    and the slice after it would copy the input and the (m, N) output once more."""
    block_m = min(self.block_m, max(16, pc.next_pow2(m)))
    while block_m > 16 and m % block_m:
      block_m //= 2
    return dataclasses.replace(self, block_m=block_m)


def gelu_tanh(h):
  """GELU, tanh approximation (jax.nn.gelu(approximate=True)), written as h * sigmoid(2z)."""
  z = _SQRT_2_OVER_PI * (h + 0.044715 * h * h * h)
  return h / (1.0 + jnp.exp(-2.0 * z))


def supports(m: int, k: int, n: int, dtype, tiles: Tiles = Tiles()) -> bool:
  """Whether the kernel takes these shapes and dtype (K and N multiples of the tiles;
  bf16, fp16 or fp32, the last with IEEE fp32 dots)."""
  return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16, jnp.float32) and m > 0
          and k % tiles.block_k == 0 and n % tiles.block_n == 0)


def _kernel(x_ref, w_ref, b_ref, o_ref, *, block_k: int, precision):
  """One (block_m, block_n) output tile; x_ref (block_m, K), w_ref (K, block_n)."""

  def body(i, acc):
    x = x_ref[:, pl.ds(i * block_k, block_k)]
    w = w_ref[pl.ds(i * block_k, block_k), :]
    return acc + pc.dot(x, w, precision=precision)

  acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body,
                          jnp.zeros((x_ref.shape[0], w_ref.shape[1]), jnp.float32))
  o_ref[...] = gelu_tanh(acc + b_ref[...].astype(jnp.float32)[None, :]).astype(o_ref.dtype)


def dense_gelu_pallas(x_MK, w_KN, b_N, *, tiles: Tiles | None = None,
                      interpret: bool | None = None):
  """gelu_tanh(x @ w + b) as (M, N) in x's dtype; w and b are cast to x's dtype first.

  block_m shrinks to divide M (`Tiles.fit`); M that 16 does not divide is padded (the
  padded rows are sliced off). K and N must be multiples of block_k and block_n (`supports`).
  interpret: run in Pallas' interpreter (None: the MVAR_PALLAS_INTERPRET env var). Under a
  mesh, each device runs it on its rows (`per_shard.over_batch`).
  """
  m, k = x_MK.shape
  if w_KN.shape[0] != k or b_N.shape != (w_KN.shape[1],):
    raise ValueError(f'dense_gelu_pallas: x {x_MK.shape}, w {w_KN.shape}, b {b_N.shape} '
                     'do not chain')
  tiles = (tiles or Tiles()).fit(m)
  tiles.validate()
  if not supports(m, k, w_KN.shape[1], x_MK.dtype, tiles):
    raise ValueError(f'dense_gelu_pallas: K {k} and N {w_KN.shape[1]} must be multiples of '
                     f'{tiles.block_k} and {tiles.block_n} ({x_MK.dtype})')
  call = functools.partial(_call, tiles=tiles, interpret=pc.resolve_interpret(interpret))
  # Under a mesh: once per device on its rows (a batch split over the leading axis stays so
  # when (B, L, C) is flattened to rows), the weights whole on each device.
  return per_shard.over_batch(call, x_MK,
                              shared=(w_KN.astype(x_MK.dtype), b_N.astype(x_MK.dtype)))


def _call(x_MK, w_KN, b_N, *, tiles: Tiles, interpret: bool):
  m, k = x_MK.shape
  n = w_KN.shape[1]
  padded = -m % tiles.block_m
  if padded:
    x_MK = jnp.pad(x_MK, ((0, padded), (0, 0)))
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=tiles.block_k, precision=pc.dot_precision(x_MK.dtype)),
      grid=((m + padded) // tiles.block_m, n // tiles.block_n),
      in_specs=[pl.BlockSpec((tiles.block_m, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, tiles.block_n), lambda i, j: (0, j)),
                pl.BlockSpec((tiles.block_n,), lambda i, j: (j,))],
      out_specs=pl.BlockSpec((tiles.block_m, tiles.block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m + padded, n), x_MK.dtype),
      compiler_params=pc.compiler_params(tiles.num_warps, tiles.num_stages),
      interpret=interpret,
      name='dense_gelu',
  )(x_MK, w_KN, b_N)
  return out[:m] if padded else out
