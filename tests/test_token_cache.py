"""Token cache: round trip, atomic shards, flipped ids, metadata checks, the 'tokens' pipeline."""

import json
import os

import numpy as np
import pytest

from mvar_jax.data import pipeline
from mvar_jax.data import token_cache

PATCH_NUMS = (1, 2, 3)
L = sum(p * p for p in PATCH_NUMS)  # 14
VOCAB = 4096


def fake_encode(images_BHWC, vocab=VOCAB):
  """A deterministic stand-in for the VQ-VAE: ids from column-weighted pixel sums, so the ids of
  an image and of its mirror differ."""
  px = np.round((np.asarray(images_BHWC) + 1) * 127.5).astype(np.int64)
  cols = np.arange(1, px.shape[2] + 1)
  s_B = (px.sum(axis=(1, 3)) * cols).sum(-1)
  return ((s_B[:, None] * np.arange(1, L + 1)) % vocab).astype(np.int32)


def _data_cfg(**kw):
  cfg = pipeline.default_data_config()
  cfg.builtin_train_size, cfg.builtin_val_size = 40, 12
  cfg.update(kw)
  return cfg


def _batches(split='train', n_batch=8):
  return pipeline.create_dataset(_data_cfg(), split=split, batch_size=n_batch, shuffle=False,
                                 repeat=False, drop_remainder=False)


def _build(path, *, flip=True, **kw):
  kw = {'num_scales_len': L, 'vocab_size': VOCAB, 'patch_nums': PATCH_NUMS, 'image_size': 32,
        'shard_size': 16, **kw}
  return token_cache.build_token_cache(_batches(), fake_encode, str(path), flip=flip, **kw)


def _reference():
  batches = list(_batches())
  imgs = np.concatenate([b['image'] for b in batches])
  return imgs, np.concatenate([b['label'] for b in batches])


def test_round_trip(tmp_path):
  meta = _build(tmp_path / 'train')
  imgs, labels = _reference()
  ids, got_labels, loaded = token_cache.load_token_cache(str(tmp_path / 'train'))
  assert ids.dtype == np.int32 and ids.shape == (40, L)
  np.testing.assert_array_equal(ids, fake_encode(imgs))
  np.testing.assert_array_equal(got_labels, labels)
  assert loaded['count'] == meta['count'] == 40 and loaded['L'] == L
  assert tuple(loaded['patch_nums']) == PATCH_NUMS and loaded['vocab_size'] == VOCAB
  flipped, _, _ = token_cache.load_token_cache(str(tmp_path / 'train'), flipped=True)
  np.testing.assert_array_equal(flipped, fake_encode(imgs[:, :, ::-1]))
  assert not np.array_equal(flipped, ids)


def test_files_are_sharded_uint16_and_no_temporaries_remain(tmp_path):
  _build(tmp_path)
  names = sorted(os.listdir(tmp_path))
  assert names == ['meta-00000-of-00001.json', 'shard-00000-00000.npz', 'shard-00000-00001.npz',
                   'shard-00000-00002.npz']  # 40 examples in shards of >= 16
  with np.load(tmp_path / 'shard-00000-00000.npz') as z:
    assert z['ids'].dtype == np.uint16 and z['ids_flip'].dtype == np.uint16
    assert z['labels'].dtype == np.int32
  meta = json.loads((tmp_path / 'meta-00000-of-00001.json').read_text())
  assert meta['flip'] is True and meta['count'] == 40 and meta['dtype'] == 'uint16'


def test_large_vocabularies_are_stored_as_int32(tmp_path):
  token_cache.build_token_cache(_batches(), lambda x: fake_encode(x, 70_000) + 65_536,
                                str(tmp_path), num_scales_len=L, vocab_size=200_000)
  ids, _, meta = token_cache.load_token_cache(str(tmp_path))
  assert meta['dtype'] == 'int32' and ids.max() >= 65_536


@pytest.mark.parametrize('key,want,have', [('L', 15, 14), ('num_scales_len', 15, 14),
                                           ('vocab_size', 8192, 4096),
                                           ('patch_nums', (1, 2, 4), (1, 2, 3)),
                                           ('image_size', 64, 32)])
def test_metadata_mismatch_names_both_values(tmp_path, key, want, have):
  _build(tmp_path)
  with pytest.raises(ValueError) as e:
    token_cache.load_token_cache(str(tmp_path), expect={key: want})
  msg = str(e.value)
  assert f'={have!r}' in msg and f'={want!r}' in msg


def test_matching_expectations_pass(tmp_path):
  _build(tmp_path)
  token_cache.load_token_cache(str(tmp_path), expect={'L': L, 'vocab_size': VOCAB,
                                                      'patch_nums': list(PATCH_NUMS)})


def test_bad_encoder_output_and_arguments_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='num_scales_len=13'):
    token_cache.build_token_cache(_batches(), fake_encode, str(tmp_path / 'a'), num_scales_len=13,
                                  vocab_size=VOCAB)
  with pytest.raises(ValueError, match='vocab_size=100'):
    token_cache.build_token_cache(_batches(), fake_encode, str(tmp_path / 'b'), num_scales_len=L,
                                  vocab_size=100)
  with pytest.raises(ValueError, match='patch_nums'):
    token_cache.build_token_cache(_batches(), fake_encode, str(tmp_path / 'c'), num_scales_len=L,
                                  vocab_size=VOCAB, patch_nums=(1, 2))


def test_existing_cache_needs_overwrite(tmp_path):
  _build(tmp_path)
  with pytest.raises(FileExistsError):
    _build(tmp_path)
  _build(tmp_path, flip=False, overwrite=True)
  assert token_cache.load_token_cache(str(tmp_path))[2]['flip'] is False


def test_missing_and_incomplete_caches_are_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match='no token cache'):
    token_cache.load_token_cache(str(tmp_path / 'nothing'))
  _build(tmp_path, process_index=1, process_count=2)
  with pytest.raises(ValueError, match='process_count=2'):
    token_cache.load_token_cache(str(tmp_path))


def test_parts_of_several_processes_are_merged(tmp_path):
  for pi in range(2):
    # Each process encodes its own share of the data.
    batches = pipeline.create_dataset(_data_cfg(), split='train', batch_size=8, process_index=pi,
                                      process_count=2, shuffle=False, repeat=False,
                                      drop_remainder=False)
    token_cache.build_token_cache(batches, fake_encode, str(tmp_path), num_scales_len=L,
                                  vocab_size=VOCAB, process_index=pi, process_count=2)
  ids, labels, meta = token_cache.load_token_cache(str(tmp_path))
  imgs, ref_labels = _reference()
  assert meta['count'] == 40
  np.testing.assert_array_equal(ids, fake_encode(imgs))
  np.testing.assert_array_equal(labels, ref_labels)


def test_tokens_pipeline_yields_int32_ids(tmp_path):
  _build(tmp_path / 'train')
  cfg = _data_cfg(name='tokens', data_dir=str(tmp_path), hflip=True)
  it = pipeline.create_dataset(cfg, split='train', batch_size=8, token_expect={'L': L})
  b = next(it)
  assert b['ids'].shape == (8, L) and b['ids'].dtype == np.int32
  assert b['label'].shape == (8,) and b['label'].dtype == np.int32
  ids, _, _ = token_cache.load_token_cache(str(tmp_path / 'train'))
  flipped, _, _ = token_cache.load_token_cache(str(tmp_path / 'train'), flipped=True)
  rows = {r.tobytes() for r in ids} | {r.tobytes() for r in flipped}
  assert all(r.astype(np.int32).tobytes() in rows for r in b['ids'])
  # With hflip some rows come from the mirrored images.
  seen = np.concatenate([next(it)['ids'] for _ in range(4)])
  assert any(r.tobytes() in {f.tobytes() for f in flipped} for r in seen)
  # Same seed, same batches.
  again = pipeline.create_dataset(cfg, split='train', batch_size=8)
  np.testing.assert_array_equal(next(again)['ids'], b['ids'])


def test_tokens_pipeline_checks_the_cache(tmp_path):
  _build(tmp_path / 'train', flip=False)
  cfg = _data_cfg(name='tokens', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='L=14'):
    pipeline.create_dataset(cfg, split='train', batch_size=8, token_expect={'L': 680})
  with pytest.raises(ValueError, match='hflip'):
    pipeline.create_dataset(_data_cfg(name='tokens', data_dir=str(tmp_path), hflip=True),
                            split='train', batch_size=8)
  with pytest.raises(ValueError, match='image_size=64'):
    pipeline.create_dataset(_data_cfg(name='tokens', data_dir=str(tmp_path), image_size=64),
                            split='train', batch_size=8)
  with pytest.raises(ValueError, match='num_classes=3'):
    pipeline.create_dataset(_data_cfg(name='tokens', data_dir=str(tmp_path), num_classes=3),
                            split='train', batch_size=8)


_KILLED_BUILD = r'''
import sys, time
import numpy as np
from mvar_jax.data import token_cache
path, ready, L, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def batches():
  for i in range(10):
    if i == 5:  # two shards of 8 are on disk, the third is buffered: stop here until killed
      open(ready, 'w').close()
      time.sleep(600)
    yield {'image': np.full((4, 4, 4, 3), i / 10, np.float32), 'label': np.arange(4) % 3}

token_cache.build_token_cache(batches(), lambda x: (np.round(x.mean(axis=(1, 2, 3)) * 10)[:, None]
                              + np.arange(L)).astype(np.int32) % vocab, path,
                              num_scales_len=L, vocab_size=vocab, shard_size=8)
'''


def test_a_cache_half_written_by_a_killed_build_is_detected_and_rebuilt(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  path, ready = str(tmp_path / 'train'), str(tmp_path / 'ready')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, '-c', _KILLED_BUILD, path, ready, str(L), str(VOCAB)],
                          env=dict(os.environ, PYTHONPATH=root))
  try:
    deadline = time.time() + 120
    while not os.path.exists(ready):
      assert proc.poll() is None, 'the build exited before it was killed'
      assert time.time() < deadline, 'the build never reached the kill point'
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert sorted(os.listdir(path)) == ['shard-00000-00000.npz', 'shard-00000-00001.npz']
  assert not token_cache.is_complete(path)
  with pytest.raises(FileNotFoundError, match='interrupted'):
    token_cache.load_token_cache(path)

  # The rerun (no overwrite=True, nothing deleted by hand) rebuilds the part from scratch.
  batches = [{'image': np.full((4, 4, 4, 3), i / 10, np.float32), 'label': np.arange(4) % 3}
             for i in range(10)]
  encode = lambda x: (np.round(x.mean(axis=(1, 2, 3)) * 10)[:, None]
                      + np.arange(L)).astype(np.int32) % VOCAB
  meta = token_cache.build_token_cache(iter(batches), encode, path, num_scales_len=L,
                                       vocab_size=VOCAB, shard_size=8)
  assert meta['count'] == 40 and token_cache.is_complete(path)
  ids, labels, _ = token_cache.load_token_cache(path)
  want = np.concatenate([encode(b['image']) for b in batches])
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_array_equal(labels, np.tile(np.arange(4) % 3, 10))


def test_a_truncated_shard_is_reported_and_rebuilt(tmp_path):
  _build(tmp_path)
  shard = tmp_path / 'shard-00000-00001.npz'
  shard.write_bytes(shard.read_bytes()[:100])
  assert not token_cache.is_complete(str(tmp_path))
  with pytest.raises(ValueError, match=r'shard-00000-00001\.npz has 100 bytes'):
    token_cache.load_token_cache(str(tmp_path))
  _build(tmp_path)  # no overwrite needed: the part is damaged, not complete
  ids, _, _ = token_cache.load_token_cache(str(tmp_path))
  np.testing.assert_array_equal(ids, fake_encode(_reference()[0]))
