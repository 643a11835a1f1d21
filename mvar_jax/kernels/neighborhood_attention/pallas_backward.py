"""Backward Pallas kernels: dQ (plus delta) by query blocks, then dK/dV by key blocks.

Two kernels rather than one with atomics: each program owns the rows it writes, so the
result is deterministic. The dK/dV kernel walks the query blocks that can see its key
block (the inverse of the window rule, `MapGeometry.query_block_range`).
"""

from __future__ import annotations

import functools

from jax import lax
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mvar_jax.kernels.neighborhood_attention import pallas_common as pc


def _dq_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, delta_ref, *,
               geom: pc.MapGeometry, block_q: int, block_k: int, scale: float):
  """One (query block, batch, head): dQ over the key band; also writes delta = rowsum(dO * O)."""
  n = geom.n
  q_block = pl.program_id(0)
  q0 = q_block * block_q
  precision = pc.dot_precision(q_ref.dtype)
  q_QD = pc.load_rows(q_ref, q0, block_q, n)
  do_QD = pc.load_rows(do_ref, q0, block_q, n)
  o_QD = pc.load_rows(o_ref, q0, block_q, n)
  lse_Q = pc.load_vec(lse_ref, q0, block_q, n)
  # Fused here (this program reads O and dO anyway) instead of a separate pre-pass.
  delta_Q = jnp.sum(o_QD.astype(jnp.float32) * do_QD.astype(jnp.float32), axis=1)
  row_lo_Q, col_lo_Q = geom.window_lo(pc.iota(q0, block_q))
  qk_scale = scale * pc.LOG2E

  def body(k_block, dq_QD):
    k0 = k_block * block_k
    k_KD = pc.load_rows(k_ref, k0, block_k, n)
    v_KD = pc.load_rows(v_ref, k0, block_k, n)
    s_QK = pc.dot(q_QD, k_KD, trans_b=True, precision=precision) * qk_scale
    mask_QK = geom.in_window(row_lo_Q[:, None], col_lo_Q[:, None], pc.iota(k0, block_k)[None, :])
    p_QK = jnp.exp2(jnp.where(mask_QK, s_QK, pc.MASK_VALUE) - lse_Q[:, None])  # masked: 0
    dp_QK = pc.dot(do_QD, v_KD, trans_b=True, precision=precision)
    ds_QK = p_QK * (dp_QK - delta_Q[:, None])
    return dq_QD + pc.dot(ds_QK.astype(k_KD.dtype), k_KD, precision=precision)

  k_lo, k_hi = geom.key_block_range(q_block, block_q, block_k)
  dq_QD = lax.fori_loop(k_lo, k_hi, body, jnp.zeros(q_QD.shape, jnp.float32))
  pc.store_rows(dq_ref, q0, dq_QD * scale, n)
  pc.store_vec(delta_ref, q0, delta_Q, n)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 geom: pc.MapGeometry, block_q: int, block_k: int, scale: float):
  """One (key block, batch, head): dK and dV over the query blocks that see this key block.

  Works on transposed tiles (keys x queries) so that dV = P^T dO and dK = dS^T Q are plain
  products without transposing P.
  """
  n = geom.n
  k_block = pl.program_id(0)
  k0 = k_block * block_k
  precision = pc.dot_precision(q_ref.dtype)
  k_KD = pc.load_rows(k_ref, k0, block_k, n)
  v_KD = pc.load_rows(v_ref, k0, block_k, n)
  k_idx_K1 = pc.iota(k0, block_k)[:, None]
  qk_scale = scale * pc.LOG2E

  def body(q_block, carry):
    dk_KD, dv_KD = carry
    q0 = q_block * block_q
    q_QD = pc.load_rows(q_ref, q0, block_q, n)
    do_QD = pc.load_rows(do_ref, q0, block_q, n)
    lse_Q = pc.load_vec(lse_ref, q0, block_q, n)
    delta_Q = pc.load_vec(delta_ref, q0, block_q, n)
    q_idx_Q = pc.iota(q0, block_q)
    row_lo_Q, col_lo_Q = geom.window_lo(q_idx_Q)
    # Tail queries (>= N) clamp to a real window, so they must be masked explicitly here.
    mask_KQ = (geom.in_window(row_lo_Q[None, :], col_lo_Q[None, :], k_idx_K1)
               & (q_idx_Q < n)[None, :])
    s_KQ = pc.dot(k_KD, q_QD, trans_b=True, precision=precision) * qk_scale
    p_KQ = jnp.exp2(jnp.where(mask_KQ, s_KQ, pc.MASK_VALUE) - lse_Q[None, :])  # masked: 0
    dv_KD = dv_KD + pc.dot(p_KQ.astype(do_QD.dtype), do_QD, precision=precision)
    dp_KQ = pc.dot(v_KD, do_QD, trans_b=True, precision=precision)
    ds_KQ = p_KQ * (dp_KQ - delta_Q[None, :])
    dk_KD = dk_KD + pc.dot(ds_KQ.astype(q_QD.dtype), q_QD, precision=precision)
    return dk_KD, dv_KD

  q_lo, q_hi = geom.query_block_range(k_block, block_q, block_k)
  zeros = jnp.zeros(k_KD.shape, jnp.float32)
  dk_KD, dv_KD = lax.fori_loop(q_lo, q_hi, body, (zeros, zeros))
  pc.store_rows(dk_ref, k0, dk_KD * scale, n)
  pc.store_rows(dv_ref, k0, dv_KD, n)


def backward(q_BNHD, k_BNHD, v_BNHD, o_BNHD, lse_BHN, do_BNHD, *, geom: pc.MapGeometry,
             scale: float, block_sizes: pc.BlockSizes, interpret: bool):
  """Returns dq, dk, dv (B, N, heads, D) in the inputs' dtype."""
  batch, n, heads, head_dim = q_BNHD.shape
  map_spec = pl.BlockSpec((None, n, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  vec_spec = pl.BlockSpec((None, None, n), lambda i, b, h: (b, h, 0))
  params = pc.compiler_params(block_sizes.num_warps_bwd, block_sizes.num_stages_bwd)

  bq, bk = block_sizes.block_q_dq, block_sizes.block_k_dq
  dq, delta_BHN = pl.pallas_call(
      functools.partial(_dq_kernel, geom=geom, block_q=bq, block_k=bk, scale=scale),
      grid=(pl.cdiv(n, bq), batch, heads),
      in_specs=[map_spec] * 5 + [vec_spec],
      out_specs=[map_spec, vec_spec],
      out_shape=[jax.ShapeDtypeStruct(q_BNHD.shape, q_BNHD.dtype),
                 jax.ShapeDtypeStruct((batch, heads, n), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      name='na2d_bwd_dq',
  )(q_BNHD, k_BNHD, v_BNHD, o_BNHD, do_BNHD, lse_BHN)

  bq, bk = block_sizes.block_q_dkv, block_sizes.block_k_dkv
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, geom=geom, block_q=bq, block_k=bk, scale=scale),
      grid=(pl.cdiv(n, bk), batch, heads),
      in_specs=[map_spec] * 4 + [vec_spec, vec_spec],
      out_specs=[map_spec, map_spec],
      out_shape=[jax.ShapeDtypeStruct(k_BNHD.shape, k_BNHD.dtype),
                 jax.ShapeDtypeStruct(v_BNHD.shape, v_BNHD.dtype)],
      compiler_params=params,
      interpret=interpret,
      name='na2d_bwd_dkdv',
  )(q_BNHD, k_BNHD, v_BNHD, do_BNHD, lse_BHN, delta_BHN)
  return dq, dk, dv
