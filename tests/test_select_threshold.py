"""The Pallas top-k/top-p threshold (radix selection): the sort-based threshold's values, exactly.

The kernel runs in Pallas' interpreter here; its CUDA lowering is checked with jax.export.
The filtering semantics themselves (upstream's rule) are specified in test_sampling.py, for
both implementations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax import sampling
from mvar_jax.kernels import select_threshold

from cuda_lowering import compile_for_sm90, export_for_cuda, triton_calls


def test_ordered_keys_sort_as_the_floats_and_invert():
  # (No subnormals: XLA flushes them to zero.)
  values = np.array([-np.inf, -3e38, -2.5, -1e-30, -0.0, 0.0, 1e-30, 0.75, 2.5, 3e38, np.inf],
                    np.float32)
  keys = np.asarray(select_threshold.ordered_keys(jnp.asarray(values)))
  assert keys.dtype == np.int32
  assert np.all(np.diff(keys.astype(np.int64)) >= 0)
  assert keys[4] == keys[5]  # -0.0 and +0.0 compare equal as floats: one key
  assert np.all(np.diff(np.delete(keys, 4).astype(np.int64)) > 0)
  back = np.asarray(select_threshold.from_keys(jnp.asarray(keys)))
  np.testing.assert_array_equal(back, np.where(values == 0, 0.0, values))


def _logits(rows, vocab, seed, ties=True, neg_inf=True, tie_rank=None):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
  if ties:  # row 0: a block of copies of its tie_rank-th largest value (at the k-th: tied there)
    x[0, : vocab // 4] = np.sort(x[0])[-(tie_rank or vocab // 3)]
  if neg_inf:
    x[-1, ::3] = -np.inf
  return jnp.asarray(x)


@pytest.mark.parametrize('rows,vocab,top_k,top_p', [
    (7, 1000, 100, 0.96),   # V not a power of two; rows not a multiple of the block
    (16, 4096, 900, 0.96),  # the sampler's vocabulary and settings
    (5, 64, 0, 0.9),        # top-k off
    (5, 64, 64, 0.5),       # top-k = V: off
    (6, 128, 13, 1.0),      # top-p off
    (4, 32, 1, 0.3),        # only the max survives top-k
])
def test_same_threshold_as_the_sort(rows, vocab, top_k, top_p, block_rows=1, num_warps=4):
  logits = _logits(rows, vocab, seed=rows * vocab + top_k, tie_rank=max(top_k, 1))
  if 0 < top_k < vocab:
    assert np.sum(np.asarray(logits[0]) >= np.sort(np.asarray(logits[0]))[-top_k]) > top_k
  want = np.asarray(sampling.kept_threshold(logits, top_k=top_k, top_p=top_p,
                                            implementation='sort'))[:, 0]
  got = np.asarray(select_threshold.kept_threshold_pallas(
      logits, top_k=top_k, top_p=top_p, block_rows=block_rows, num_warps=num_warps,
      interpret=True))
  np.testing.assert_array_equal(got, want)
  assert np.all(np.any(np.asarray(logits) == got[:, None], axis=1)), 'a threshold is a logit'


@pytest.mark.parametrize('block_rows,num_warps', [(2, 8), (4, 8)])
def test_several_rows_per_program(block_rows, num_warps):
  test_same_threshold_as_the_sort(7, 1000, 100, 0.96, block_rows, num_warps)
  test_same_threshold_as_the_sort(16, 4096, 900, 0.96, block_rows, num_warps)


def test_per_row_top_p_and_many_random_rows():
  logits = _logits(192, 512, seed=3, ties=False, neg_inf=False)
  top_p = jnp.linspace(0.05, 1.0, 192)
  want = np.asarray(sampling.kept_threshold(logits[:, None], top_k=50, top_p=top_p[:, None, None],
                                            implementation='sort'))[:, 0, 0]
  got = np.asarray(select_threshold.kept_threshold_pallas(logits, top_k=50, top_p=top_p,
                                                          interpret=True))
  np.testing.assert_array_equal(got, want)


def test_kept_threshold_takes_any_leading_shape_and_refuses_unknown_implementations(monkeypatch):
  monkeypatch.setenv('MVAR_PALLAS_INTERPRET', '1')
  logits = _logits(6, 40, seed=1).reshape(2, 3, 40)
  got = sampling.kept_threshold(logits, top_k=9, top_p=0.9, implementation='pallas')
  want = sampling.kept_threshold(logits, top_k=9, top_p=0.9, implementation='sort')
  assert got.shape == (2, 3, 1)
  np.testing.assert_array_equal(got, want)
  per_row = jnp.array([0.3, 0.6, 0.9]).reshape(1, 3, 1)  # top_p per row, broadcast
  np.testing.assert_array_equal(
      sampling.kept_threshold(logits, top_k=9, top_p=per_row, implementation='pallas'),
      sampling.kept_threshold(logits, top_k=9, top_p=per_row, implementation='sort'))
  with pytest.raises(ValueError, match="implementation must be one of .*'radix'"):
    sampling.kept_threshold(logits, top_k=9, top_p=0.9, implementation='radix')


def test_auto_is_the_sort_off_gpu():
  # On CPU 'auto' must not pick the Pallas kernel (it would need the interpreter).
  logits = _logits(3, 40, seed=2)
  jaxpr = str(jax.make_jaxpr(functools.partial(sampling.kept_threshold, top_k=9, top_p=0.9))(
      logits))
  assert 'pallas_call' not in jaxpr and 'sort' in jaxpr


def _kept_threshold_cuda(x, p):
  return select_threshold.kept_threshold_pallas(x, top_k=900, top_p=p)


# The sampler's last scale at d16, batch 32 with CFG: 64 x 256 rows of the 4096 logits.
_SAMPLER_ROWS = (jax.ShapeDtypeStruct((8192, 4096), jnp.float32),
                 jax.ShapeDtypeStruct((), jnp.float32))


def test_lowers_for_cuda():
  text = export_for_cuda(_kept_threshold_cuda, *_SAMPLER_ROWS)
  assert len(triton_calls(text)) == 1
  assert 'kept_threshold' in text


def test_triton_compiles_for_sm90(tmp_path):
  kernels = compile_for_sm90(_kept_threshold_cuda, *_SAMPLER_ROWS, workdir=tmp_path)
  assert len(kernels) == 1 and next(iter(kernels)).startswith('kept_threshold')
