"""Pallas neighbourhood-attention kernel: same function as `reference.na2d_gather`.

Runs the kernels through the Pallas interpreter on CPU (interpret=True), and lowers them for
CUDA on CPU (jax.export) so that a kernel Triton cannot take fails here, not on the GPU.
In interpret mode, tile rows read past N are NaN (the interpreter's uninitialised value), and
outputs start as NaN: every padded-size case is also a poison test, and an unwritten output
element would show as NaN.
"""

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax.kernels.neighborhood_attention import api
from mvar_jax.kernels.neighborhood_attention import pallas_common as pc
from mvar_jax.kernels.neighborhood_attention import pallas_kernel
from mvar_jax.kernels.neighborhood_attention import reference
from mvar_jax.kernels.neighborhood_attention.pallas_kernel import BlockSizes

from cuda_lowering import compile_for_sm90, export_for_cuda, triton_calls

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16,
                   block_q_dkv=16, block_k_dkv=16)
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                   block_q_dkv=16, block_k_dkv=32)
WIDE = BlockSizes(block_q=64, block_k=32, block_q_dq=32, block_k_dq=64,
                  block_q_dkv=64, block_k_dkv=16)


def _inputs(seed, shape, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
  return q, k, v, dout


def _rel_err(x, ref):
  """max |x - ref| / max |ref|, in float64 on the host."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


@functools.partial(jax.jit, static_argnums=(0,))
def _value_and_vjp(fn, q, k, v, dout):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(dout))


def _check_against_reference(height, width, kernel_size, batch, heads, head_dim, dtype, tol,
                             block_sizes=None, scale=None, seed=0):
  q, k, v, dout = _inputs(seed, (batch, height * width, heads, head_dim), dtype)
  kwargs = dict(height=height, width=width, kernel_size=kernel_size, scale=scale)
  pallas_fn = functools.partial(pallas_kernel.na2d_pallas, block_sizes=block_sizes,
                                interpret=True, **kwargs)
  ref_fn = functools.partial(reference.na2d_gather, **kwargs)
  got = _value_and_vjp(pallas_fn, q, k, v, dout)
  # Reference in fp32 on the same (rounded) inputs.
  f32 = lambda x: x.astype(jnp.float32)
  want = _value_and_vjp(ref_fn, f32(q), f32(k), f32(v), f32(dout))
  errs = {}
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert g.dtype == dtype and g.shape == q.shape, (name, g.dtype, g.shape)
    assert np.isfinite(np.asarray(g, np.float32)).all(), f'{name} has NaN/inf'
    errs[name] = _rel_err(g, w)
  print(f'{height}x{width} k{kernel_size} {jnp.dtype(dtype).name} D{head_dim}: '
        + ' '.join(f'{n}={e:.1e}' for n, e in errs.items()))
  assert max(errs.values()) < tol, errs
  return errs


# ---------------------------------------------------------------------------------------------
# Geometry: the band bounds must cover every window (numpy brute force, no kernels).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('height,width,kernel_size', [
    (13, 13, 7), (16, 16, 7), (13, 16, 5), (5, 9, 5), (7, 7, 7), (32, 32, 3), (8, 11, 3)])
@pytest.mark.parametrize('block_q,block_k', [(16, 16), (16, 64), (64, 32), (128, 128)])
def test_band_ranges_cover_every_window(height, width, kernel_size, block_q, block_k):
  geom = pc.MapGeometry(height, width, kernel_size)
  mask_NN = reference.neighbor_mask(height, width, kernel_size)
  n = geom.n
  idx = np.arange(n)
  row_lo, col_lo = geom.window_lo(idx)
  np.testing.assert_array_equal(
      np.asarray(geom.in_window(row_lo[:, None], col_lo[:, None], idx[None, :])), mask_NN)
  for qb in range(-(-n // block_q)):
    lo, hi = (int(x) for x in geom.key_block_range(qb, block_q, block_k))
    keys = np.nonzero(mask_NN[qb * block_q:(qb + 1) * block_q].any(0))[0]
    assert lo * block_k <= keys.min() and keys.max() < hi * block_k, (qb, lo, hi)
    assert 0 <= lo < hi <= -(-n // block_k)
  for kb in range(-(-n // block_k)):
    lo, hi = (int(x) for x in geom.query_block_range(kb, block_q, block_k))
    queries = np.nonzero(mask_NN[:, kb * block_k:(kb + 1) * block_k].any(1))[0]
    assert lo * block_q <= queries.min() and queries.max() < hi * block_q, (kb, lo, hi)
    assert 0 <= lo < hi <= -(-n // block_q)


# ---------------------------------------------------------------------------------------------
# Forward and backward against the gather reference (interpret mode).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('height,width,kernel_size,batch,heads,head_dim,block_sizes,scale', [
    (13, 13, 7, 1, 2, 16, MIXED, None),   # N=169: tails in every kernel
    (16, 16, 5, 2, 1, 32, None, 0.3),     # N a multiple of the default blocks
    (13, 16, 3, 1, 2, 16, SMALL, None),   # non-square, small kernel
    (16, 13, 7, 2, 1, 16, WIDE, None),    # non-square the other way, blocks > rows
    (5, 9, 5, 1, 1, 16, SMALL, None),     # kernel == height: only columns slide
    (7, 7, 7, 1, 1, 16, None, None),      # window == map: plain attention
    (16, 16, 7, 1, 1, 64, MIXED, None),   # D=64
])
def test_fp32_matches_reference(height, width, kernel_size, batch, heads, head_dim,
                                block_sizes, scale):
  _check_against_reference(height, width, kernel_size, batch, heads, head_dim, jnp.float32,
                           1e-5, block_sizes=block_sizes, scale=scale)


@pytest.mark.parametrize('height,width,kernel_size,head_dim,dtype,block_sizes', [
    (13, 13, 7, 64, jnp.bfloat16, None),
    (13, 16, 5, 32, jnp.bfloat16, MIXED),
    (16, 16, 3, 16, jnp.float16, SMALL),
])
def test_low_precision_matches_fp32_reference(height, width, kernel_size, head_dim, dtype,
                                              block_sizes):
  _check_against_reference(height, width, kernel_size, 2, 2, head_dim, dtype, 2e-2,
                           block_sizes=block_sizes, seed=1)


def test_large_logits_stay_finite():
  # Sharp softmax (scale 4 on unit normals, D=16): exercises the online max correction.
  _check_against_reference(13, 13, 5, 1, 1, 16, jnp.float32, 1e-5, block_sizes=SMALL,
                           scale=4.0, seed=2)


def test_unmasked_tail_loads_would_poison_output(monkeypatch):
  """Negative control: the NaN tails are real, so the masked loads are what keeps them out."""
  def load_rows_unmasked(ref, start, size, n):
    del n
    return plgpu.load(ref.at[pl.ds(start, size), :])

  monkeypatch.setattr(pc, 'load_rows', load_rows_unmasked)
  q, k, v, _ = _inputs(3, (1, 169, 1, 16), jnp.float32)
  out = pallas_kernel.na2d_pallas(q, k, v, height=13, width=13, kernel_size=7,
                                  block_sizes=SMALL, interpret=True)
  assert np.isnan(np.asarray(out)).any()


# ---------------------------------------------------------------------------------------------
# API plumbing and input validation.
# ---------------------------------------------------------------------------------------------
def test_api_switch_and_env_var(monkeypatch):
  q, k, v, _ = _inputs(4, (1, 36, 2, 16), jnp.float32)
  kwargs = dict(height=6, width=6, kernel_size=3)
  want = reference.na2d_gather(q, k, v, **kwargs)
  assert api.resolve_implementation('auto') == 'blocked'  # CPU: never the kernel
  got = api.neighborhood_attention(q, k, v, implementation='pallas', interpret=True,
                                   block_sizes=SMALL, **kwargs)
  assert _rel_err(got, want) < 1e-5
  monkeypatch.setenv(pc.INTERPRET_ENV, '1')
  got = api.neighborhood_attention(q, k, v, implementation='pallas', **kwargs)
  assert _rel_err(got, want) < 1e-5


def test_auto_is_the_kernel_on_gpu_and_the_blocked_op_elsewhere(monkeypatch):
  # The GPU choice follows launch/results/h100_2026-11-25.md (Pallas fastest in every case).
  assert api.resolve_implementation('auto') == 'blocked'  # the tests run on CPU
  monkeypatch.setattr(api.jax, 'default_backend', lambda: 'gpu')
  assert api.resolve_implementation('auto') == 'pallas'


def test_auto_on_gpu_falls_back_for_unsupported_head_dim(monkeypatch):
  monkeypatch.setattr(api.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(api, 'GPU_DEFAULT', 'pallas')
  assert api.resolve_implementation('auto') == 'pallas'
  q, k, v, _ = _inputs(5, (1, 36, 1, 24), jnp.float32)  # D=24: not a power of two
  kwargs = dict(height=6, width=6, kernel_size=3)
  got = api.neighborhood_attention(q, k, v, implementation='auto', **kwargs)
  np.testing.assert_allclose(got, reference.na2d_dense(q, k, v, **kwargs), atol=1e-6)


@pytest.mark.parametrize('shape,dtype,block_sizes,match', [
    ((1, 36, 1, 24), jnp.float32, None, 'head dim'),
    ((1, 36, 1, 8), jnp.float32, None, 'head dim'),
    ((1, 36, 1, 16), jnp.int32, None, 'dtype'),
    ((1, 35, 1, 16), jnp.float32, None, r'\(B, 36'),
    ((1, 36, 1, 16), jnp.float32, BlockSizes(block_q=24), 'block_q'),
    ((1, 36, 1, 16), jnp.float32, BlockSizes(block_k_dkv=8), 'block_k_dkv'),
])
def test_rejects_bad_inputs(shape, dtype, block_sizes, match):
  x = jnp.zeros(shape, dtype)
  with pytest.raises(ValueError, match=match):
    pallas_kernel.na2d_pallas(x, x, x, height=6, width=6, kernel_size=3,
                              block_sizes=block_sizes, interpret=True)


# ---------------------------------------------------------------------------------------------
# CUDA lowering on CPU: jaxpr -> Triton IR for every kernel, exported as StableHLO; then each
# kernel's Triton IR compiled to sm_90 PTX and cubin, as XLA would on an H100 (tests/cuda_lowering.py).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('height,width', [(16, 16), (13, 13)])
@pytest.mark.parametrize('with_backward', [False, True])
def test_lowers_for_cuda(height, width, with_backward):
  shape = jax.ShapeDtypeStruct((2, height * width, 4, 64), jnp.bfloat16)
  attend = functools.partial(pallas_kernel.na2d_pallas, height=height, width=width,
                             kernel_size=7, interpret=False)
  if with_backward:
    fn = lambda q, k, v: jax.vjp(attend, q, k, v)[1](q)
  else:
    fn = attend
  text = export_for_cuda(fn, shape, shape, shape)
  # Forward: one kernel. Forward + backward: forward, dQ and dK/dV.
  assert len(triton_calls(text)) == (3 if with_backward else 1), text[:2000]
  for name in ('na2d_fwd',) + (('na2d_bwd_dq', 'na2d_bwd_dkdv') if with_backward else ()):
    assert name in text


@pytest.mark.parametrize('height,width,head_dim,dtype', [
    (16, 16, 64, jnp.bfloat16), (13, 13, 64, jnp.bfloat16), (32, 32, 128, jnp.bfloat16),
    (13, 16, 64, jnp.float16), (16, 16, 64, jnp.float32)])
def test_triton_compiles_for_sm90(tmp_path, height, width, head_dim, dtype):
  shape = jax.ShapeDtypeStruct((2, height * width, 4, head_dim), dtype)
  attend = functools.partial(pallas_kernel.na2d_pallas, height=height, width=width,
                             kernel_size=7, interpret=False)
  kernels = compile_for_sm90(lambda q, k, v: jax.vjp(attend, q, k, v)[1](q),
                             shape, shape, shape, workdir=tmp_path)
  assert sorted(kernels) == ['na2d_bwd_dkdv', 'na2d_bwd_dq', 'na2d_fwd']
  block_sizes = BlockSizes.get_default(head_dim, dtype)
  assert kernels['na2d_fwd'].num_warps == block_sizes.num_warps
  assert kernels['na2d_bwd_dq'].num_warps == block_sizes.num_warps_bwd
  if dtype != jnp.float32:  # fp32 is IEEE (FMA units) by design
    for name, kernel in kernels.items():
      assert 'wgmma' in kernel.ptx, f'{name}: expected Hopper wgmma matrix instructions'
