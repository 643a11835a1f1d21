"""Forward Pallas kernel: online-softmax attention over each query block's key band."""

from __future__ import annotations

import functools

from jax import lax
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mvar_jax.kernels.neighborhood_attention import pallas_common as pc


def _l2_normalize_rows(x_RD):
  """Rows over their l2 norm (max(norm, 1e-12), as torch's F.normalize), fp32."""
  x32 = x_RD.astype(jnp.float32)
  norm_R = jnp.sqrt(jnp.sum(x32 * x32, axis=1))
  return x32 / jnp.maximum(norm_R, 1e-12)[:, None]


def _add_bias_rows(x_RD, bias_ref):
  """x + bias (D,) per row, summed in fp32 and rounded to x's dtype (XLA's add of the two)."""
  bias_1D = bias_ref[...].astype(jnp.float32)[None, :]
  return (x_RD.astype(jnp.float32) + bias_1D).astype(x_RD.dtype)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, geom: pc.MapGeometry, block_q: int,
                    block_k: int, scale: float, normalize_qk: bool):
  """One (query block, batch, head): refs are the whole (N, D) map of that batch and head.

  normalize_qk: q, k and v arrive as the qkv projection without its bias; the kernel adds
  each part's bias (refs[1:4], (D,) for this head) as it loads rows, l2-normalises q and k
  rows and multiplies q by the head's scale (refs[0]: 16 copies of it), rounding each step
  to the input dtype as the model's XLA passes do before attention.
  """
  if normalize_qk:
    head_scale_ref, q_bias_ref, k_bias_ref, v_bias_ref, o_ref, lse_ref = refs
  else:
    o_ref, lse_ref = refs
  n = geom.n
  q_block = pl.program_id(0)
  q0 = q_block * block_q
  precision = pc.dot_precision(q_ref.dtype)
  q_QD = pc.load_rows(q_ref, q0, block_q, n)
  if normalize_qk:
    head_scale = jnp.max(head_scale_ref[...].astype(jnp.float32))
    q_QD = _add_bias_rows(q_QD, q_bias_ref)
    q_QD = (_l2_normalize_rows(q_QD) * head_scale).astype(q_ref.dtype)
  row_lo_Q, col_lo_Q = geom.window_lo(pc.iota(q0, block_q))
  qk_scale = scale * pc.LOG2E  # softmax in base 2: exp2 is the cheap instruction

  def body(k_block, carry):
    acc_QD, m_Q, l_Q = carry
    k0 = k_block * block_k
    k_KD = pc.load_rows(k_ref, k0, block_k, n)
    v_KD = pc.load_rows(v_ref, k0, block_k, n)
    if normalize_qk:
      k_KD = _l2_normalize_rows(_add_bias_rows(k_KD, k_bias_ref)).astype(k_ref.dtype)
      v_KD = _add_bias_rows(v_KD, v_bias_ref)
    s_QK = pc.dot(q_QD, k_KD, trans_b=True, precision=precision) * qk_scale
    mask_QK = geom.in_window(row_lo_Q[:, None], col_lo_Q[:, None], pc.iota(k0, block_k)[None, :])
    s_QK = jnp.where(mask_QK, s_QK, pc.MASK_VALUE)
    m_new_Q = jnp.maximum(m_Q, jnp.max(s_QK, axis=1))
    # Rows with every key masked so far carry p = 1 junk; the first real key makes
    # alpha = exp2(MASK - real) = 0, which wipes it.
    alpha_Q = jnp.exp2(m_Q - m_new_Q)
    p_QK = jnp.exp2(s_QK - m_new_Q[:, None])
    l_Q = alpha_Q * l_Q + jnp.sum(p_QK, axis=1)
    acc_QD = alpha_Q[:, None] * acc_QD + pc.dot(p_QK.astype(v_KD.dtype), v_KD, precision=precision)
    return acc_QD, m_new_Q, l_Q

  k_lo, k_hi = geom.key_block_range(q_block, block_q, block_k)
  init = (jnp.zeros(q_QD.shape, jnp.float32),
          jnp.full((block_q,), pc.MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc_QD, m_Q, l_Q = lax.fori_loop(k_lo, k_hi, body, init)
  # Every real query sees k*k keys, so l >= 1; tail rows (>= N) are not stored.
  pc.store_rows(o_ref, q0, acc_QD / l_Q[:, None], n)
  pc.store_vec(lse_ref, q0, m_Q + jnp.log2(l_Q), n)


def forward(q_BNHD, k_BNHD, v_BNHD, *, geom: pc.MapGeometry, scale: float,
            block_sizes: pc.BlockSizes, interpret: bool):
  """Returns out (B, N, heads, D) in q's dtype and lse (B, heads, N) fp32 in base-2 units."""
  batch, n, heads, head_dim = q_BNHD.shape
  bq, bk = block_sizes.block_q, block_sizes.block_k
  kernel = functools.partial(_forward_kernel, geom=geom, block_q=bq, block_k=bk, scale=scale,
                             normalize_qk=False)
  # Whole (N, D) maps per (batch, head): each program slices its own query block and key band.
  map_spec = pl.BlockSpec((None, n, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, bq), batch, heads),  # query blocks fastest: neighbours share K/V in L2
      in_specs=[map_spec, map_spec, map_spec],
      out_specs=[map_spec, pl.BlockSpec((None, None, n), lambda i, b, h: (b, h, 0))],
      out_shape=[jax.ShapeDtypeStruct(q_BNHD.shape, q_BNHD.dtype),
                 jax.ShapeDtypeStruct((batch, heads, n), jnp.float32)],
      compiler_params=pc.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name='na2d_fwd',
  )(q_BNHD, k_BNHD, v_BNHD)


def forward_from_qkv(qkv_BN3HD, head_scale_H, bias_3HD, *, geom: pc.MapGeometry, scale: float,
                     block_sizes: pc.BlockSizes, interpret: bool):
  """Inference forward from the qkv projection (B, N, 3, heads, D) without its bias: the
  kernel adds bias_3HD (3, heads, D), l2-normalises q and k and multiplies q by head_scale_H
  (heads,) fp32. Returns out (B, N, heads, D).

  The three operands are the same array read at q, k and v: no XLA pass adds the bias,
  writes normalised q and k or a sliced v first.
  """
  batch, n, three, heads, head_dim = qkv_BN3HD.shape
  if three != 3:
    raise ValueError(f'qkv must be (B, N, 3, heads, D), got {qkv_BN3HD.shape}')
  bq, bk = block_sizes.block_q, block_sizes.block_k
  kernel = functools.partial(_forward_kernel, geom=geom, block_q=bq, block_k=bk, scale=scale,
                             normalize_qk=True)
  part = lambda j: pl.BlockSpec((None, n, None, None, head_dim),
                                lambda i, b, h: (b, 0, j, h, 0))
  bias = lambda j: pl.BlockSpec((None, None, head_dim), lambda i, b, h: (j, h, 0))
  # 16 copies per head: a Triton block needs a power-of-two size; the kernel takes their max.
  head_scale_H16 = jnp.broadcast_to(head_scale_H.astype(jnp.float32)[:, None], (heads, 16))
  out, _ = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, bq), batch, heads),
      in_specs=[part(0), part(1), part(2), pl.BlockSpec((None, 16), lambda i, b, h: (h, 0)),
                bias(0), bias(1), bias(2)],
      out_specs=[pl.BlockSpec((None, n, None, head_dim), lambda i, b, h: (b, 0, h, 0)),
                 pl.BlockSpec((None, None, n), lambda i, b, h: (b, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, n, heads, head_dim), qkv_BN3HD.dtype),
                 jax.ShapeDtypeStruct((batch, heads, n), jnp.float32)],
      compiler_params=pc.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name='na2d_fwd_qkv',
  )(qkv_BN3HD, qkv_BN3HD, qkv_BN3HD, head_scale_H16, bias_3HD, bias_3HD, bias_3HD)
  return out
