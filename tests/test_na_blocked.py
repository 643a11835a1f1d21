"""Specification of the blocked neighbourhood op (blocked.py): the reference's function.

Query row blocks attend to the band of key rows their windows reach; every block size and
map shape must give the gather reference's values and gradients (NATTEN's own numbers are checked
for every pure-JAX implementation in test_na_reference.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax.kernels.neighborhood_attention import blocked, reference
from test_na_reference import brute_force_na2d, random_qkv


@pytest.mark.parametrize('height,width,kernel_size,block_rows', [
    (5, 5, 3, 1),     # one row per block
    (6, 9, 3, 4),     # last block padded (6 = 4 + 2)
    (9, 6, 5, 2),     # bands shifted up at the bottom border
    (7, 7, 7, 3),     # window == map: the band is the whole map
    (13, 13, 7, 5),   # MVAR's first neighbourhood scale, padded last block
    (8, 5, 5, 8),     # one block holds the map
    (3, 4, 1, 2),     # kernel 1: each query sees only itself
])
def test_matches_the_brute_force_loop(height, width, kernel_size, block_rows):
  q, k, v = random_qkv(block_rows, batch=2, height=height, width=width, heads=2, head_dim=8)
  out = blocked.na2d_blocked(q, k, v, height=height, width=width, kernel_size=kernel_size,
                             scale=0.6, block_rows=block_rows)
  want = brute_force_na2d(q, k, v, height=height, width=width, kernel_size=kernel_size, scale=0.6)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('height,width,kernel_size,block_rows', [
    (6, 9, 3, 2), (9, 6, 5, 4), (16, 16, 7, None), (13, 13, 7, 3)])
def test_values_and_gradients_match_gather(height, width, kernel_size, block_rows):
  q, k, v = random_qkv(3, batch=2, height=height, width=width, heads=2, head_dim=16)
  cot = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  kw = dict(height=height, width=width, kernel_size=kernel_size, scale=0.4)

  def vjp(f):
    out, pullback = jax.vjp(jax.jit(lambda q, k, v: f(q, k, v)), q, k, v)
    return (out, *pullback(cot))

  ours = vjp(lambda q, k, v: blocked.na2d_blocked(q, k, v, block_rows=block_rows, **kw))
  ref = vjp(lambda q, k, v: reference.na2d_gather(q, k, v, **kw))
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), ours, ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize('height,width,kernel_size,block_rows',
                         [(16, 16, 7, 4), (13, 13, 7, 5), (9, 6, 5, 2), (32, 32, 7, 8)])
def test_each_band_holds_every_window_of_its_block(height, width, kernel_size, block_rows):
  lo, band, mask = blocked.band_plan(height, width, kernel_size, block_rows)
  assert band <= block_rows + kernel_size - 1 and np.all(lo >= 0) and np.all(lo + band <= height)
  dense = reference.neighbor_mask(height, width, kernel_size)
  n = height * width
  for i, start in enumerate(lo):
    queries = np.arange(i * block_rows * width, min((i + 1) * block_rows * width, n))
    keys = np.arange(start * width, (start + band) * width)
    np.testing.assert_array_equal(mask[i, :len(queries)], dense[np.ix_(queries, keys)])
    # No key of a query's window lies outside its block's band.
    assert dense[queries].sum() == mask[i, :len(queries)].sum()


def test_bf16_is_finite_and_close_to_fp32():
  q, k, v = random_qkv(0, batch=2, height=7, width=9, heads=2, head_dim=16, dtype=jnp.bfloat16)
  kw = dict(height=7, width=9, kernel_size=5, block_rows=3)
  out = blocked.na2d_blocked(q, k, v, **kw)
  out32 = blocked.na2d_blocked(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), out32, atol=2e-2, rtol=0)


def test_bad_inputs_are_rejected_before_compiling():
  q, k, v = random_qkv(0, batch=1, height=6, width=6, heads=1, head_dim=4)
  with pytest.raises(ValueError, match='kernel_size 7 is larger than the 6x6 map'):
    blocked.na2d_blocked(q, k, v, height=6, width=6, kernel_size=7)
  with pytest.raises(ValueError, match='block_rows must be >= 1, got -1'):
    blocked.na2d_blocked(q, k, v, height=6, width=6, kernel_size=3, block_rows=-1)
  with pytest.raises(ValueError, match=r'expected \(B, 30, heads, D\) for a 5x6 map'):
    blocked.na2d_blocked(q, k, v, height=5, width=6, kernel_size=3)


@pytest.mark.parametrize('side,want_rows', [(10, 10), (13, 13), (16, 8), (20, 7), (32, 4), (64, 4)])
def test_default_blocks_save_work_or_the_map_is_one_block(side, want_rows):
  # Two 10-row blocks of a 13x13 map each see all 13 key rows: 20 x 13 query-key rows against
  # 13 x 13 at once, so the default there is the whole map (the dense op).
  rows = blocked.default_block_rows(side, side, 7)
  assert rows == want_rows
  if rows < side:
    lo, band, mask = blocked.band_plan(side, side, 7, rows)
    assert len(lo) * rows * band < side * side


def test_one_block_is_the_dense_op():
  q, k, v = random_qkv(4, batch=2, height=13, width=13, heads=2, head_dim=8)
  kw = dict(height=13, width=13, kernel_size=7, scale=0.5)
  np.testing.assert_array_equal(blocked.na2d_blocked(q, k, v, **kw),
                                reference.na2d_dense(q, k, v, **kw))
  np.testing.assert_allclose(blocked.na2d_blocked(q, k, v, **kw),
                             reference.na2d_gather(q, k, v, **kw), atol=1e-5, rtol=0)
