"""Converted-weight directories: flax-compatible streamed files, a manifest, named corruption."""

import json
import logging
import os

import jax
import numpy as np
import pytest
from flax import serialization

from mvar_jax import api, checkpointing, convert, converted_io, vqvae

CFG = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=16,
                        patch_nums=(1, 2, 3, 4), using_sa=False, using_mid_sa=False)


@pytest.fixture(scope='module')
def params():
  """Random values in the initialiser's shapes (compiling VQVAE.init costs more than this file)."""
  import flax.linen as nn
  shapes = jax.eval_shape(lambda: nn.unbox(vqvae.init_params(CFG, jax.random.key(0))['params']))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


@pytest.fixture
def weights(tmp_path, params):
  """A real converted directory (what `python -m mvar_jax.convert` and the tokenizer trainer write)."""
  convert.save_converted(str(tmp_path), 'vqvae', CFG, params)
  return str(tmp_path)


def assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_files_are_what_flax_writes_and_round_trip(weights, params):
  assert sorted(os.listdir(weights)) == ['vqvae.json', 'vqvae.manifest.json', 'vqvae.msgpack']
  with open(os.path.join(weights, 'vqvae.msgpack'), 'rb') as f:
    blob = f.read()
  assert blob == serialization.msgpack_serialize(params)
  cfg, loaded = checkpointing.load_converted(weights, 'vqvae')
  assert cfg['_type'] == 'VQVAEConfig'
  assert_same(loaded, params)
  manifest = json.loads(open(os.path.join(weights, 'vqvae.manifest.json')).read())
  assert manifest['files']['vqvae.msgpack']['bytes'] == len(blob)


def test_leaves_can_be_streamed_from_callables(tmp_path):
  calls = []

  def leaf(i):
    calls.append(i)
    return np.full((i + 1, 3), i, np.float32)

  tree = {'b': {'x': lambda: leaf(1)}, 'a': lambda: leaf(0), 'c': np.int32(7)}
  converted_io.write_converted(str(tmp_path), 'm', {'k': 1}, tree)
  assert calls == [0, 1]  # each fetched once, in file order
  _, got = converted_io.read_converted(str(tmp_path), 'm')
  np.testing.assert_array_equal(got['b']['x'], np.ones((2, 3), np.float32))
  assert got['c'] == 7 and got['a'].shape == (1, 3)


def test_directories_written_before_manifests_still_load(tmp_path, params, caplog):
  with open(tmp_path / 'vqvae.msgpack', 'wb') as f:
    f.write(serialization.msgpack_serialize(params))
  (tmp_path / 'vqvae.json').write_text(json.dumps(convert.config_to_dict(CFG)))
  with caplog.at_level(logging.WARNING):
    cfg, loaded = api.load_converted(str(tmp_path), 'vqvae')
  assert cfg == CFG
  assert_same(loaded, params)
  assert 'integrity not checked' in caplog.text


def _corrupt(path, how):
  size = os.path.getsize(path)
  if how == 'truncated':
    with open(path, 'r+b') as f:
      f.truncate(size // 2)
  elif how == 'flipped':
    with open(path, 'r+b') as f:
      f.seek(size // 2)
      chunk = f.read(64)
      f.seek(size // 2)
      f.write(bytes(b ^ 0xFF for b in chunk))
  elif how == 'appended':
    with open(path, 'ab') as f:
      f.write(b'\0' * 8)


@pytest.mark.parametrize('name, how, message', [
    ('vqvae.msgpack', 'truncated', r'vqvae\.msgpack: truncated: \d+ bytes, the manifest says \d+'),
    ('vqvae.msgpack', 'flipped', r'vqvae\.msgpack: hash mismatch'),
    ('vqvae.msgpack', 'appended', r'vqvae\.msgpack: \d+ bytes, the manifest says'),
    ('vqvae.json', 'flipped', r'vqvae\.json: hash mismatch'),
    ('vqvae.manifest.json', 'truncated', r'vqvae\.manifest\.json: unreadable manifest'),
])
def test_corrupted_files_are_named_with_what_is_wrong(weights, name, how, message):
  _corrupt(os.path.join(weights, name), how)
  for load in (checkpointing.load_converted, api.load_converted):
    with pytest.raises(converted_io.CorruptWeightsError, match=message) as info:
      load(weights, 'vqvae')
    assert 'reconvert' in str(info.value)


def test_a_file_missing_from_the_manifest_directory_is_named(weights):
  os.remove(os.path.join(weights, 'vqvae.msgpack'))
  with pytest.raises(FileNotFoundError, match=r'vqvae\.msgpack not found'):
    api.load_converted(weights, 'vqvae')


def test_a_truncated_file_without_manifest_is_named_not_a_bare_msgpack_error(weights):
  os.remove(os.path.join(weights, 'vqvae.manifest.json'))
  _corrupt(os.path.join(weights, 'vqvae.msgpack'), 'truncated')
  with pytest.raises(converted_io.CorruptWeightsError, match=r'vqvae\.msgpack: unreadable'):
    checkpointing.load_converted(weights, 'vqvae')


def test_rewriting_a_directory_replaces_files_and_manifest_together(weights, params):
  other = jax.tree_util.tree_map(lambda x: x + 1, params)
  convert.save_converted(weights, 'vqvae', CFG, other)
  _, loaded = checkpointing.load_converted(weights, 'vqvae')
  assert_same(loaded, other)
  assert not [f for f in os.listdir(weights) if '.tmp-' in f]
