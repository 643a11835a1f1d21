"""Checkpointing: sharded round trip, retention, atomicity, preemption flag, converted weights."""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mvar_jax import checkpointing, sharding


def _mesh():
  return sharding.create_mesh({'data': 4, 'fsdp': 2})


def _state(mesh, seed=0):
  """A small train-state-like dict: a weight sharded on fsdp, a replicated counter."""
  w_sharding = NamedSharding(mesh, P('fsdp', None))
  w = jax.device_put(np.random.default_rng(seed).normal(size=(8, 6)).astype(np.float32), w_sharding)
  return {'params': {'w': w}, 'step': jax.device_put(jnp.int32(seed), NamedSharding(mesh, P()))}


def _abstract(state):
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def test_round_trip_restores_values_shardings_and_meta(tmp_path):
  mesh = _mesh()
  state = _state(mesh, seed=3)
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=True)
  ckpt.save(7, state, meta={'window': {'loss': 1.5}, 'nan': float('nan')})
  ckpt.wait()
  restored, meta = ckpt.restore(_abstract(state))
  np.testing.assert_array_equal(restored['params']['w'], state['params']['w'])
  assert restored['params']['w'].sharding == state['params']['w'].sharding
  assert int(restored['step']) == 3
  assert meta['step'] == 7 and meta['window'] == {'loss': 1.5} and meta['nan'] == 'nan'
  ckpt.close()


def test_keeps_the_last_n(tmp_path):
  mesh = _mesh()
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2, async_save=False)
  for step in range(1, 6):
    ckpt.save(step, _state(mesh, step))
  ckpt.wait()
  assert ckpt.all_steps() == [4, 5]
  assert ckpt.latest_step() == 5
  ckpt.close()


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
  """A save cut short leaves `<step>.orbax-checkpoint-tmp*`: never listed, never restored."""
  mesh = _mesh()
  directory = tmp_path / 'ckpt'
  ckpt = checkpointing.Checkpointer(str(directory), async_save=False)
  ckpt.save(1, _state(mesh, 1))
  ckpt.close()
  # Simulate a kill mid-write of step 2: a copy of a real step with its array data truncated.
  partial = directory / '2.orbax-checkpoint-tmp-1234567'
  shutil.copytree(directory / '1', partial)
  for root, _, files in os.walk(partial):
    for f in files:
      with open(os.path.join(root, f), 'r+b') as fh:
        fh.truncate(max(0, os.path.getsize(os.path.join(root, f)) // 3))
  (partial / 'commit_success.txt').unlink(missing_ok=True)

  ckpt = checkpointing.Checkpointer(str(directory), async_save=False)
  assert ckpt.latest_step() == 1
  restored, meta = ckpt.restore(_abstract(_state(mesh, 1)))
  assert meta['step'] == 1 and int(restored['step']) == 1
  ckpt.save(2, _state(mesh, 2))  # the step number is usable again
  ckpt.wait()
  assert ckpt.latest_step() == 2
  assert not any('tmp' in p for p in os.listdir(directory))
  ckpt.close()


def test_restore_without_checkpoint_names_the_directory(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='no finished checkpoint'):
    ckpt.restore({})
  ckpt.close()


def test_partial_restore_of_one_entry(tmp_path):
  mesh = _mesh()
  state = _state(mesh, 5)
  state['ema_params'] = {'w': state['params']['w'] * 2}
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  ckpt.save(1, state)
  assert set(ckpt.item_structure(1)) == {'params', 'step', 'ema_params'}
  out = ckpt.restore_subtree(1, {'ema_params': _abstract(state)['ema_params']})
  np.testing.assert_array_equal(out['ema_params']['w'], state['ema_params']['w'])
  ckpt.close()


def test_sigterm_sets_the_stop_flag_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionWatcher() as watcher:
    assert not watcher.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.requested and watcher.should_stop(1)
    assert watcher.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == before


def test_load_converted_and_tree_check(tmp_path):
  from mvar_jax import convert
  from mvar_jax.attention import AttentionConfig
  from mvar_jax.transformer import TransformerConfig
  cfg = TransformerConfig(depth=1, width=8, num_heads=2, vocab_size=5, cvae=3, num_classes=2,
                          patch_nums=(1, 2), attention=AttentionConfig(refine_step=2))
  params = {'a': {'kernel': np.ones((2, 3), np.float32)}, 'b': np.zeros((4,), np.float32)}
  convert.save_converted(str(tmp_path), 'transformer', cfg, params)
  cfg_dict, loaded = checkpointing.load_converted(str(tmp_path), 'transformer')
  assert cfg_dict['depth'] == 1 and cfg_dict['attention']['refine_step'] == 2
  np.testing.assert_array_equal(loaded['a']['kernel'], params['a']['kernel'])
  checkpointing.check_tree_matches(loaded, params, 'x')
  with pytest.raises(ValueError, match=r"mis-shaped: \['a'\]\['kernel'\] \(2, 3\) vs \(3, 2\)"):
    other = {'a': {'kernel': np.ones((3, 2))}, 'b': params['b']}
    checkpointing.check_tree_matches(loaded, other, 'x')
  with pytest.raises(FileNotFoundError, match='converted checkpoint directory'):
    checkpointing.load_converted(str(tmp_path), 'vqvae')
