"""Checkpointing: sharded round trip, retention, atomicity, integrity and fallback, converted weights."""

import glob
import logging
import os
import shutil

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


@pytest.mark.parametrize('min_slice_bytes', [0, None])
def test_replicated_leaves_round_trip_whether_or_not_replicas_split_them(
    tmp_path, monkeypatch, min_slice_bytes):
  """Orbax splits a leaf held by the 4 'data' replicas among them when each part reaches
  MIN_REPLICA_PARALLEL_SLICE_BYTES (0: every leaf; default: only the 8 MiB one)."""
  if min_slice_bytes is not None:
    monkeypatch.setattr(checkpointing, 'MIN_REPLICA_PARALLEL_SLICE_BYTES', min_slice_bytes)
  mesh = _mesh()
  big = np.random.default_rng(1).normal(size=(1024, 2048)).astype(np.float32)  # 1 MiB parts
  state = dict(_state(mesh, 2), big=jax.device_put(big, NamedSharding(mesh, P('fsdp', None))),
               bias=jax.device_put(np.arange(12, dtype=np.float32), NamedSharding(mesh, P())))
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  ckpt.save(1, state)
  restored, _ = ckpt.restore(_abstract(state))
  ckpt.close()
  for name in ('big', 'bias'):
    np.testing.assert_array_equal(restored[name], state[name])
    assert restored[name].sharding == state[name].sharding
  np.testing.assert_array_equal(restored['params']['w'], state['params']['w'])


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


# ----------------------------------------------------------------------------- integrity and fallback

def _data_files(step_dir):
  """The array data files Orbax wrote for a step (ocdbt/zarr chunks), largest first."""
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  return sorted(files, key=os.path.getsize, reverse=True)


def _flip_64_bytes(path):
  with open(path, 'r+b') as f:
    f.seek(max(0, os.path.getsize(path) // 2 - 32))
    chunk = f.read(64)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _corrupt_in_place(step_dir, how):
  """Damages the largest data file of a saved step: 'delete', 'truncate' or 'flip'."""
  target = _data_files(step_dir)[0]
  if how == 'delete':
    os.remove(target)
  elif how == 'truncate':
    with open(target, 'r+b') as f:
      f.truncate(os.path.getsize(target) // 2)
  else:
    _flip_64_bytes(target)
  return target


@pytest.mark.parametrize('how', ['delete', 'truncate', 'flip'])
def test_corrupt_newest_step_falls_back_to_the_previous_one(tmp_path, how, caplog):
  mesh = _mesh()
  directory = tmp_path / 'ckpt'
  ckpt = checkpointing.Checkpointer(str(directory), async_save=False)
  big = lambda seed: dict(_state(mesh, seed), params={
      'w': jax.device_put(np.random.default_rng(seed).normal(size=(64, 64)).astype(np.float32))})
  ckpt.save(1, big(1))
  ckpt.save(2, big(2))
  ckpt.close()
  _corrupt_in_place(str(directory / '2'), how)

  ckpt = checkpointing.Checkpointer(str(directory), async_save=False)
  with caplog.at_level(logging.ERROR):
    state, meta = ckpt.restore_latest_good(_abstract(big(1)))
  assert meta['step'] == 1 and int(state['step']) == 1
  np.testing.assert_array_equal(state['params']['w'], big(1)['params']['w'])
  # One paragraph names the step, its directory and the reason; the step is moved, not deleted.
  (record,) = [r for r in caplog.records if 'set aside' in r.getMessage()]
  text = record.getMessage()
  assert 'step 2' in text and str(directory / '2') in text and 'Reason' in text
  assert ckpt.all_steps() == [1]
  aside = glob.glob(f'{directory}.corrupt/2-*')
  assert len(aside) == 1 and os.path.isdir(aside[0])
  ckpt.save(2, big(2))  # the run goes on and can write step 2 again
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_flipped_bytes_are_caught_by_the_checksums(tmp_path):
  mesh = _mesh()
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  state = _state(mesh, 4)
  state['params']['w'] = jax.device_put(  # random values: no compression hides the flip
      np.random.default_rng(4).normal(size=(64, 64)).astype(np.float32))
  ckpt.save(1, state)
  meta = ckpt.restore_meta(1)
  assert meta['digest'] == checkpointing.DIGEST
  assert set(meta[checkpointing.CHECKSUMS]) == {"['params']['w']", "['step']"}
  ckpt.close()
  _flip_64_bytes(_data_files(str(tmp_path / 'ckpt' / '1'))[0])
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  # The store decodes the damaged chunk without complaint; the checksum names the array.
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=r"\['params'\]\['w'\] \(saved [0-9a-f]{16}, read [0-9a-f]{16}\)"):
    ckpt.restore(_abstract(state), 1)
  with pytest.raises(checkpointing.CorruptCheckpointError, match='nothing was moved'):
    ckpt.restore_latest_good(_abstract(state))
  ckpt.close()


def test_fingerprint_sees_any_change_of_one_word():
  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  base = checkpointing.fingerprint({'x': x})
  y = x.copy()
  y.view(np.uint32)[3, 4] ^= 1  # the lowest mantissa bit of one value
  assert checkpointing.fingerprint({'x': y}) != base
  assert checkpointing.fingerprint({'x': x.copy()}) == base
  bf16 = jnp.asarray(x, jnp.bfloat16)
  assert checkpointing.fingerprint({'x': bf16}) != checkpointing.fingerprint({'x': bf16 * 2})


def test_another_model_config_is_an_error_and_moves_nothing(tmp_path):
  mesh = _mesh()
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  ckpt.save(1, _state(mesh, 1))
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  other = _abstract(_state(mesh, 1))
  other['params']['w'] = jax.ShapeDtypeStruct((8, 7), jnp.float32)
  with pytest.raises(ValueError, match=r'params/w \(8, 6\) vs expected \(8, 7\)'):
    ckpt.restore_latest_good(other)
  assert ckpt.all_steps() == [1] and not os.path.exists(f'{tmp_path}/ckpt.corrupt')
  ckpt.close()


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
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"mis-shaped \(1\): a/kernel \(2, 3\) vs expected \(3, 2\)"):
    other = {'a': {'kernel': np.ones((3, 2))}, 'b': params['b']}
    checkpointing.check_tree_matches(loaded, other, 'x')
  with pytest.raises(FileNotFoundError, match='converted checkpoint directory'):
    checkpointing.load_converted(str(tmp_path), 'vqvae')
