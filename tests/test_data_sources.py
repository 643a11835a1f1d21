"""Training sources: the global batch is a function of (seed, step) alone."""

import numpy as np
import pytest

from mvar_jax.data import sources


def test_step_indexed_source_is_a_pure_function_of_step():
  arrays = {'x': np.arange(10), 'label': np.arange(10)}
  src = sources.StepIndexedSource(arrays, 4, seed=3)
  assert src.steps_per_epoch == 3  # ceil(10 / 4), the last batch filled from the start
  epoch0 = np.concatenate([src.batch(s)['x'] for s in range(3)])
  assert sorted(epoch0[:10].tolist()) == list(range(10))
  np.testing.assert_array_equal(epoch0[10:], epoch0[:2])
  again = sources.StepIndexedSource(arrays, 4, seed=3)
  for s in (7, 2, 5, 5, 0):  # any order, any restart: same batch for the same step
    np.testing.assert_array_equal(again.batch(s)['x'], src.batch(s)['x'])
  assert not np.array_equal(src.batch(3)['x'], src.batch(0)['x'])  # a new epoch reshuffles




def test_process_slices_concatenate_to_the_single_process_global_batch():
  """Two processes (emulated) read halves of the batch one process reads, flips included."""
  n, batch = 22, 8
  arrays = {'x': np.arange(n) * 10, 'label': np.arange(n) % 3}

  def transform(rows, u):  # an augmentation that depends on the per-row draws
    return {'x': np.where(u < 0.5, -rows['x'], rows['x']), 'label': rows['label']}
  one = sources.StepIndexedSource(arrays, batch, seed=7, transform=transform)
  two = [sources.StepIndexedSource(arrays, batch, seed=7, transform=transform, process_index=p,
                                   process_count=2) for p in range(2)]
  assert one.steps_per_epoch == two[0].steps_per_epoch == 3
  flipped = 0
  for step in (0, 1, 2, 3, 7, 11):
    full = one.batch(step)
    halves = [src.batch(step) for src in two]
    assert all(len(h['x']) == batch // 2 for h in halves)
    for key in ('x', 'label'):
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])
    flipped += int(np.sum(full['x'] < 0))
  assert 0 < flipped < 6 * batch  # the transform really ran with varying draws


def test_bad_process_split_is_refused():
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    sources.StepIndexedSource({'x': np.arange(8)}, 8, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='empty'):
    sources.StepIndexedSource({'x': np.arange(0)}, 8, seed=0)
