"""Specification of the pure-JAX 2D neighbourhood attention (reference.py, api.py).

NATTEN semantics: query (i, j) of an H x W map attends to the k x k window whose top-left
corner is (clamp(i - k//2, 0, H - k), clamp(j - k//2, 0, W - k)). Maps are raster-ordered,
(B, N, heads, D) with N = H * W. The NATTEN numbers come from tests/fixtures/natten_na2d.npz,
written by tests/make_natten_fixtures.py, so this file does not need natten.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax.kernels.neighborhood_attention import api, blocked, reference

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'natten_na2d.npz')


def random_qkv(seed, *, batch, height, width, heads, head_dim, dtype=jnp.float32):
  """Fresh (B, N, heads, D) q, k, v from a seed."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  shape = (batch, height * width, heads, head_dim)
  return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def brute_force_na2d(q_BNHD, k_BNHD, v_BNHD, *, height, width, kernel_size, scale):
  """One query at a time in float64, the window built straight from the border rule."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BNHD, k_BNHD, v_BNHD))
  q_BHWhD, k_BHWhD, v_BHWhD = (x.reshape(x.shape[0], height, width, *x.shape[2:])
                               for x in (q, k, v))
  out_BHWhD = np.zeros_like(q_BHWhD)
  half = kernel_size // 2
  for i in range(height):
    r0 = min(max(i - half, 0), height - kernel_size)
    for j in range(width):
      c0 = min(max(j - half, 0), width - kernel_size)
      keys_BTHD = k_BHWhD[:, r0:r0 + kernel_size, c0:c0 + kernel_size].reshape(
          q.shape[0], kernel_size * kernel_size, *q.shape[2:])
      values_BTHD = v_BHWhD[:, r0:r0 + kernel_size, c0:c0 + kernel_size].reshape(keys_BTHD.shape)
      logits_BHT = np.einsum('bhd,bthd->bht', q_BHWhD[:, i, j], keys_BTHD) * scale
      logits_BHT -= logits_BHT.max(-1, keepdims=True)
      probs_BHT = np.exp(logits_BHT)
      probs_BHT /= probs_BHT.sum(-1, keepdims=True)
      out_BHWhD[:, i, j] = np.einsum('bht,bthd->bhd', probs_BHT, values_BTHD)
  return out_BHWhD.reshape(q.shape)


def max_abs_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------
# (a) na2d_gather is exactly the rule, checked one query at a time.

@pytest.mark.parametrize('height,width,kernel_size,scale,seed', [
    (5, 5, 3, 0.5, 0),
    (6, 9, 3, None, 1),   # non-square, default scale D**-0.5
    (9, 6, 5, 0.7, 2),    # non-square the other way, wide border bands
    (7, 7, 7, 0.3, 3),    # window == map: every query sees everything
    (5, 8, 5, 1.0, 4),    # kernel == height: rows never slide
    (4, 10, 3, 2.0, 5),   # sharp softmax
    (3, 4, 1, 0.5, 6),    # kernel 1: each query sees only itself
])
def test_gather_matches_brute_force_loop(height, width, kernel_size, scale, seed):
  q, k, v = random_qkv(seed, batch=2, height=height, width=width, heads=2, head_dim=8)
  out_BNHD = reference.na2d_gather(q, k, v, height=height, width=width,
                                   kernel_size=kernel_size, scale=scale)
  expected_BNHD = brute_force_na2d(q, k, v, height=height, width=width, kernel_size=kernel_size,
                                   scale=8 ** -0.5 if scale is None else scale)
  assert out_BNHD.shape == q.shape and out_BNHD.dtype == jnp.float32
  np.testing.assert_allclose(out_BNHD, expected_BNHD, atol=1e-5, rtol=0)
  if kernel_size == 1:
    np.testing.assert_allclose(out_BNHD, v, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------
# (b) gather and dense are the same function: values and gradients.

@pytest.mark.parametrize('height,width,kernel_size,seed', [
    (6, 9, 3, 0),
    (9, 6, 5, 1),
    (7, 7, 7, 2),
    (8, 8, 5, 3),
])
def test_gather_and_dense_agree_in_values_and_gradients(height, width, kernel_size, seed):
  q, k, v = random_qkv(seed, batch=2, height=height, width=width, heads=2, head_dim=16)
  cotangent_BNHD = jax.random.normal(jax.random.PRNGKey(100 + seed), q.shape)

  def vjp(fn):
    f = lambda q, k, v: fn(q, k, v, height=height, width=width, kernel_size=kernel_size,
                           scale=0.4)
    out, pullback = jax.vjp(jax.jit(f), q, k, v)
    return (out, *pullback(cotangent_BNHD))

  gather = vjp(reference.na2d_gather)
  dense = vjp(reference.na2d_dense)
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), gather, dense):
    assert a.shape == q.shape, name
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
  # Keys outside every window would get zero gradient; with shifted windows none exist.
  assert np.all(np.abs(np.asarray(gather[3])).sum(axis=-1) > 0)


# ----------------------------------------------------------------------------------------
# (c) NATTEN's own na2d, recorded in the fixture file.

def _fixture_cases():
  with np.load(FIXTURES) as data:
    return [str(name) for name in data['case_names']]


@pytest.mark.parametrize('case', _fixture_cases())
def test_matches_natten_fixtures(case):
  with np.load(FIXTURES) as data:
    q, k, v, out = (data[f'{case}__{x}'] for x in ('q', 'k', 'v', 'out'))
    kernel_size = int(data[f'{case}__kernel_size'])
    scale = float(data[f'{case}__scale'])
  batch, height, width, heads, head_dim = q.shape
  to_BNHD = lambda x_BHWhD: jnp.asarray(x_BHWhD.reshape(batch, height * width, heads, head_dim))
  expected_BNHD = out.reshape(batch, height * width, heads, head_dim)
  # Every pure-JAX implementation against NATTEN's own outputs.
  for fn in (reference.na2d_gather, reference.na2d_dense, blocked.na2d_blocked):
    out_BNHD = fn(to_BNHD(q), to_BNHD(k), to_BNHD(v), height=height, width=width,
                  kernel_size=kernel_size, scale=scale)
    np.testing.assert_allclose(out_BNHD, expected_BNHD, atol=1e-5, rtol=0, err_msg=fn.__name__)


def test_natten_fixture_file_is_small():
  assert os.path.getsize(FIXTURES) < 2 * 1024 * 1024


# ----------------------------------------------------------------------------------------
# (d) The windows: k*k distinct keys, contain the query, shifted (not cut) at borders.

WINDOW_SHAPES = [(5, 5, 3), (6, 9, 3), (9, 6, 5), (7, 7, 7), (13, 16, 5), (16, 13, 7), (4, 4, 1),
                 (5, 11, 5)]


@pytest.mark.parametrize('height,width,kernel_size', WINDOW_SHAPES)
def test_every_query_sees_exactly_k_squared_distinct_keys_including_itself(
    height, width, kernel_size):
  idx_NT = reference.neighbor_indices(height, width, kernel_size)
  n = height * width
  assert idx_NT.shape == (n, kernel_size ** 2) and idx_NT.dtype == np.int32
  assert idx_NT.min() >= 0 and idx_NT.max() < n
  for query, keys_T in enumerate(idx_NT):
    assert len(set(keys_T.tolist())) == kernel_size ** 2
    assert query in keys_T
  mask_NN = reference.neighbor_mask(height, width, kernel_size)
  assert mask_NN.shape == (n, n)
  np.testing.assert_array_equal(mask_NN.sum(axis=1), kernel_size ** 2)
  np.testing.assert_array_equal(np.sort(np.nonzero(mask_NN)[1].reshape(n, -1), axis=1),
                                np.sort(idx_NT, axis=1))


@pytest.mark.parametrize('height,width,kernel_size', WINDOW_SHAPES)
def test_windows_are_contiguous_blocks_centred_inside_and_shifted_at_borders(
    height, width, kernel_size):
  idx_HWkk = reference.neighbor_indices(height, width, kernel_size).reshape(
      height, width, kernel_size, kernel_size)
  rows_HWkk, cols_HWkk = idx_HWkk // width, idx_HWkk % width
  half = kernel_size // 2
  for i in range(height):
    for j in range(width):
      r0, c0 = rows_HWkk[i, j, 0, 0], cols_HWkk[i, j, 0, 0]
      # A k x k block in window-row-then-column order.
      np.testing.assert_array_equal(rows_HWkk[i, j], r0 + np.arange(kernel_size)[:, None]
                                    + np.zeros((1, kernel_size), int))
      np.testing.assert_array_equal(cols_HWkk[i, j], c0 + np.arange(kernel_size)[None, :]
                                    + np.zeros((kernel_size, 1), int))
      # Centred where it fits; otherwise pushed inside, never cut.
      assert r0 == (i - half if half <= i < height - half else (0 if i < half
                                                                 else height - kernel_size))
      assert c0 == (j - half if half <= j < width - half else (0 if j < half
                                                                else width - kernel_size))
  # The corners share the corner blocks.
  np.testing.assert_array_equal(rows_HWkk[0, 0], rows_HWkk[half, half])
  np.testing.assert_array_equal(idx_HWkk[-1, -1], idx_HWkk[height - 1 - half, width - 1 - half])
  np.testing.assert_array_equal(reference.window_starts(height, kernel_size), rows_HWkk[:, 0, 0, 0])
  np.testing.assert_array_equal(reference.window_starts(width, kernel_size), cols_HWkk[0, :, 0, 0])


# ----------------------------------------------------------------------------------------
# (e) Bad inputs fail before compiling, naming the problem.

OPS = [reference.na2d_gather, reference.na2d_dense, api.neighborhood_attention]


@pytest.mark.parametrize('op', OPS)
@pytest.mark.parametrize('kernel_size', [4, 0, -3])
def test_even_or_non_positive_kernel_is_rejected(op, kernel_size):
  q, k, v = random_qkv(0, batch=1, height=8, width=8, heads=1, head_dim=4)
  with pytest.raises(ValueError, match=f'kernel_size must be a positive odd integer, got {kernel_size}'):
    op(q, k, v, height=8, width=8, kernel_size=kernel_size)


@pytest.mark.parametrize('op', OPS)
@pytest.mark.parametrize('height,width', [(5, 5), (13, 5), (5, 13)])
def test_kernel_larger_than_map_is_rejected(op, height, width):
  q, k, v = random_qkv(0, batch=1, height=height, width=width, heads=1, head_dim=4)
  with pytest.raises(ValueError, match=f'kernel_size 7 is larger than the {height}x{width} map'):
    op(q, k, v, height=height, width=width, kernel_size=7)


@pytest.mark.parametrize('op', OPS)
def test_mismatched_shapes_are_rejected(op):
  q, k, v = random_qkv(0, batch=1, height=6, width=6, heads=2, head_dim=4)
  with pytest.raises(ValueError, match='q, k, v shapes differ'):
    op(q, k[:, :, :1], v, height=6, width=6, kernel_size=3)
  with pytest.raises(ValueError, match=r'expected \(B, 30, heads, D\) for a 5x6 map'):
    op(q, k, v, height=5, width=6, kernel_size=3)
  with pytest.raises(ValueError, match=r'expected \(B, 36, heads, D\)'):
    op(q[0], k[0], v[0], height=6, width=6, kernel_size=3)


def test_validate_accepts_kernel_equal_to_the_smaller_side():
  reference.validate(5, 13, 5)
  reference.validate(1, 1, 1)


# ----------------------------------------------------------------------------------------
# (f) The api switch.

def test_api_dense_and_gather_agree():
  q, k, v = random_qkv(7, batch=2, height=6, width=7, heads=2, head_dim=8)
  kwargs = dict(height=6, width=7, kernel_size=5, scale=0.6)
  out_dense = api.neighborhood_attention(q, k, v, implementation='dense', **kwargs)
  out_gather = api.neighborhood_attention(q, k, v, implementation='gather', **kwargs)
  np.testing.assert_allclose(out_dense, out_gather, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out_gather, reference.na2d_gather(q, k, v, **kwargs))


def test_api_unknown_implementation_lists_the_allowed_ones():
  q, k, v = random_qkv(0, batch=1, height=4, width=4, heads=1, head_dim=4)
  with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'gather', "
                                       r"'dense', 'blocked', 'pallas'\), got 'triton'"):
    api.neighborhood_attention(q, k, v, height=4, width=4, kernel_size=3, implementation='triton')
  with pytest.raises(ValueError, match='implementation must be one of'):
    api.resolve_implementation('Gather')


def test_api_auto_is_blocked_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert api.resolve_implementation('auto') == 'blocked'
  assert api.resolve_implementation(None) == 'blocked'
  assert api.resolve_implementation('dense') == 'dense'
  assert api.resolve_implementation('gather') == 'gather'
  q, k, v = random_qkv(1, batch=1, height=5, width=6, heads=2, head_dim=8)
  kwargs = dict(height=5, width=6, kernel_size=3)
  np.testing.assert_allclose(api.neighborhood_attention(q, k, v, **kwargs),
                             reference.na2d_gather(q, k, v, **kwargs), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------
# (g) bfloat16 in, bfloat16 out, close to fp32 on the same (rounded) inputs.

@pytest.mark.parametrize('op', [reference.na2d_gather, reference.na2d_dense])
@pytest.mark.parametrize('seed', [0, 1])
def test_bf16_is_finite_and_close_to_fp32(op, seed):
  q, k, v = random_qkv(seed, batch=2, height=7, width=9, heads=2, head_dim=16,
                       dtype=jnp.bfloat16)
  kwargs = dict(height=7, width=9, kernel_size=5)
  out_bf16 = op(q, k, v, **kwargs)
  out_fp32 = op(*(x.astype(jnp.float32) for x in (q, k, v)), **kwargs)
  assert out_bf16.dtype == jnp.bfloat16 and out_bf16.shape == q.shape
  assert np.all(np.isfinite(np.asarray(out_bf16, np.float32)))
  np.testing.assert_allclose(np.asarray(out_bf16, np.float32), out_fp32, atol=2e-2, rtol=0)
