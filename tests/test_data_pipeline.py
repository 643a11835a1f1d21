"""Data config, image decoding, ADM crop, and the builtin / folder / imagenet2012 pipelines."""

import io
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest

from mvar_jax.data import images
from mvar_jax.data import pipeline


def _cfg(**overrides):
  cfg = pipeline.default_data_config()
  cfg.builtin_train_size, cfg.builtin_val_size = 64, 32
  cfg.update(overrides)
  return cfg


def _encode(arr, fmt, **kw):
  buf = io.BytesIO()
  (Image.fromarray(arr) if isinstance(arr, np.ndarray) else arr).save(buf, fmt, **kw)
  return buf.getvalue()


def _noise(h, w, c=3, seed=0):
  shape = (h, w, c) if c else (h, w)
  return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


# ---- config --------------------------------------------------------------------------------------


def test_default_config_is_valid_and_every_field_is_documented():
  cfg = pipeline.validate_data_config(pipeline.default_data_config())
  src = open(pipeline.__file__).read()
  for field in cfg:
    line = next(l for l in src.splitlines() if l.strip().startswith(f'c.{field} ='))
    assert '#' in line, field


@pytest.mark.parametrize('field,value,allowed', [
    ('name', 'cifar', "'builtin'"),
    ('image_size', 4, 'int >= 8'),
    ('num_classes', 0, 'int >= 1'),
    ('hflip', 'yes', 'True | False'),
    ('prefetch', -2, 'AUTOTUNE'),
    ('seed', -1, 'int >= 0'),
    ('shuffle_buffer', 0, 'int >= 1'),
    ('builtin_train_size', 0, 'int >= 1'),
])
def test_invalid_values_name_the_field_and_allowed_values(field, value, allowed):
  # A fresh ConfigDict, as a hand-written config would be: no type-safe override to stop a bad type.
  cfg = ml_collections.ConfigDict({**_cfg().to_dict(), field: value})
  with pytest.raises(ValueError, match=f'data.{field}=') as e:
    pipeline.validate_data_config(cfg)
  assert allowed in str(e.value)


@pytest.mark.parametrize('overrides,field', [
    (dict(name='imagenet2012', num_classes=10), 'num_classes'),
    (dict(name='builtin', num_classes=1000), 'num_classes'),
    (dict(name='folder', data_dir=''), 'data_dir'),
    (dict(name='tokens', data_dir=''), 'data_dir'),
])
def test_values_invalid_for_the_dataset_are_rejected(overrides, field):
  with pytest.raises(ValueError, match=f'data.{field}='):
    pipeline.validate_data_config(_cfg(**overrides))


def test_bad_split_and_batch_size_are_rejected():
  with pytest.raises(ValueError, match='split'):
    pipeline.create_dataset(_cfg(), split='test', batch_size=8)
  with pytest.raises(ValueError, match='process_count=3'):
    pipeline.create_dataset(_cfg(), split='train', batch_size=8, process_index=0, process_count=3)


# ---- image decoding and the ADM crop -------------------------------------------------------------


_RGB = _noise(37, 91)
_MODES = {
    'gray.png': lambda: _encode(_RGB[..., 0], 'PNG'),
    'cmyk.jpg': lambda: _encode(Image.fromarray(_RGB).convert('CMYK'), 'JPEG'),
    'rgba.png': lambda: _encode(np.dstack([_RGB, _RGB[..., :1]]), 'PNG'),
    'palette.gif': lambda: _encode(Image.fromarray(_RGB).convert('P'), 'GIF'),
    'palette.png': lambda: _encode(Image.fromarray(_RGB).quantize(16), 'PNG'),
    'gray16.png': lambda: _encode(Image.fromarray(_RGB[..., 0].astype(np.uint16) * 257), 'PNG'),
    'bilevel.png': lambda: _encode(_RGB[..., 0] > 127, 'PNG'),
}


@pytest.mark.parametrize('name', sorted(_MODES))
def test_every_mode_becomes_uint8_rgb(name):
  img, converted = images.open_rgb(_MODES[name](), name=name)
  arr = np.asarray(img)
  assert img.mode == 'RGB' and converted
  assert arr.shape == (37, 91, 3) and arr.dtype == np.uint8
  assert arr.max() > 200  # 16-bit values are scaled, not clipped


def test_sixteen_bit_is_scaled_to_eight_bit():
  arr = images.load_rgb(_MODES['gray16.png']())
  np.testing.assert_array_equal(arr[..., 0], _RGB[..., 0])


@pytest.mark.parametrize('data', [b'not an image at all', b''])
def test_garbage_raises_bad_image_with_the_name(data):
  with pytest.raises(images.BadImage, match='junk.jpg'):
    images.load_rgb(data, name='junk.jpg')


def test_truncated_jpeg_raises_bad_image_with_the_file_name(tmp_path):
  full = _encode(_noise(64, 64), 'JPEG')
  path = tmp_path / 'cut.jpg'
  path.write_bytes(full[:len(full) // 2])
  with pytest.raises(images.BadImage, match='cut.jpg'):
    images.load_rgb(str(path))


def test_tiny_images_raise_tiny_image():
  with pytest.raises(images.TinyImage):
    images.load_rgb(_encode(_noise(4, 4), 'PNG'), min_size=8)
  assert images.load_rgb(_encode(_noise(4, 4), 'PNG')).shape == (4, 4, 3)


@pytest.mark.parametrize('hw', [(37, 91), (91, 37), (300, 1000), (16, 16), (64, 64), (513, 257)])
@pytest.mark.parametrize('size', [16, 32])
def test_adm_crop_output_size(hw, size):
  out = images.center_crop_adm(_noise(*hw), size)
  assert out.shape == (size, size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize('hw', [(80, 120), (90, 90), (32, 48)])
def test_adm_crop_keeps_a_centre_symmetric_image_symmetric(hw):
  # Every size here leaves an even margin after resizing, so the crop window is centred exactly.
  half = _noise(hw[0], hw[1] // 2, seed=7)
  mirror = np.concatenate([half, half[:, ::-1]], axis=1)  # left-right symmetric
  point = np.concatenate([mirror[:hw[0] // 2], mirror[:hw[0] // 2][::-1, ::-1]], axis=0)
  for sym, flip in [(mirror, lambda a: a[:, ::-1]), (point, lambda a: a[::-1, ::-1])]:
    out = images.center_crop_adm(sym, 32).astype(int)
    np.testing.assert_allclose(out, flip(out), atol=1)


def test_adm_crop_box_halves_large_images_first():
  # A 2x2-pixel checkerboard box-halved becomes flat grey; a direct bicubic resize would alias.
  board = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
  out = images.center_crop_adm(np.repeat(board[..., None], 3, -1), 32)
  assert np.ptp(out) <= 2


def test_random_hflip_is_seeded():
  x = _noise(4, 6)
  a = [images.random_hflip(x, np.random.default_rng(s)) for s in range(20)]
  b = [images.random_hflip(x, np.random.default_rng(s)) for s in range(20)]
  assert all(np.array_equal(u, v) for u, v in zip(a, b))
  flipped = sum(np.array_equal(u, x[:, ::-1]) for u in a)
  assert 0 < flipped < 20


# ---- built-in pipeline ---------------------------------------------------------------------------


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_builtin_batches_have_the_right_shapes_and_range():
  it = pipeline.create_dataset(_cfg(), split='train', batch_size=16)
  b = next(it)
  assert b['image'].shape == (16, 32, 32, 3) and b['image'].dtype == np.float32
  assert b['label'].shape == (16,) and b['label'].dtype == np.int32
  assert -1.0 <= b['image'].min() < -0.5 and 0.5 < b['image'].max() <= 1.0
  assert it.num_examples == 64 and it.stats['corrupt'] == 0


def test_builtin_same_seed_same_order_and_other_seed_differs():
  a = _take(pipeline.create_dataset(_cfg(hflip=True), split='train', batch_size=16), 6)
  b = _take(pipeline.create_dataset(_cfg(hflip=True), split='train', batch_size=16), 6)
  c = _take(pipeline.create_dataset(_cfg(hflip=True, seed=1), split='train', batch_size=16), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  assert not all(np.array_equal(x['label'], z['label']) for x, z in zip(a, c))


def test_builtin_train_and_val_are_disjoint():
  train = next(pipeline.create_dataset(_cfg(), split='train', batch_size=64, shuffle=False))
  val = next(pipeline.create_dataset(_cfg(), split='val', batch_size=32, shuffle=False))
  seen = {x.tobytes() for x in train['image']}
  assert not any(x.tobytes() in seen for x in val['image'])


def test_builtin_one_epoch_without_repeat():
  batches = list(pipeline.create_dataset(_cfg(), split='val', batch_size=10, repeat=False,
                                         drop_remainder=False))
  assert [len(b['label']) for b in batches] == [10, 10, 10, 2]


def test_process_shards_are_disjoint_and_cover_the_data():
  cfg = _cfg()
  whole = {x.tobytes() for b in pipeline.create_dataset(cfg, split='train', batch_size=8,
                                                        repeat=False) for x in b['image']}
  shards = []
  for pi in range(4):
    it = pipeline.create_dataset(cfg, split='train', batch_size=8, process_index=pi,
                                 process_count=4, repeat=False)
    shard = [x.tobytes() for b in it for x in b['image']]
    assert len(shard) == 16 and it.batch_size == 2
    shards.append(set(shard))
  assert all(not (shards[i] & shards[j]) for i in range(4) for j in range(i + 1, 4))
  assert set().union(*shards) == whole


def test_to_global_batch_builds_a_sharded_global_array():
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  batch = next(pipeline.create_dataset(_cfg(), split='train', batch_size=16))
  glob = pipeline.to_global_batch(batch, NamedSharding(mesh, P('data')))
  assert glob['image'].shape == (16, 32, 32, 3) and glob['label'].shape == (16,)
  assert len(glob['image'].sharding.device_set) == len(jax.devices())
  np.testing.assert_array_equal(np.asarray(glob['label']), batch['label'])


# ---- folder pipeline -----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """train/ with 3 classes of 4 good RGB images each, plus every kind of awkward file."""
  root = tmp_path_factory.mktemp('folder')
  for c, name in enumerate(['cats', 'dogs', 'eels']):
    d = root / 'train' / name
    d.mkdir(parents=True)
    for i in range(4):
      (d / f'{i}.jpg').write_bytes(_encode(_noise(40 + 9 * i, 50 + 7 * c, seed=10 * c + i), 'JPEG'))
  d = root / 'train' / 'cats'
  (d / 'corrupt.jpg').write_bytes(b'\x00garbage, not a jpeg')
  full = _encode(_noise(64, 64, seed=99), 'JPEG')
  (d / 'truncated.jpg').write_bytes(full[:len(full) // 3])
  (d / 'tiny.png').write_bytes(_encode(_noise(4, 4), 'PNG'))
  (d / 'notes.txt').write_text('not an image extension: ignored, not counted')
  d = root / 'train' / 'dogs'
  (d / 'gray.png').write_bytes(_MODES['gray.png']())
  (d / 'cmyk.jpg').write_bytes(_MODES['cmyk.jpg']())
  (d / 'rgba.png').write_bytes(_MODES['rgba.png']())
  (d / 'sub').mkdir()
  (d / 'sub' / 'palette.gif').write_bytes(_MODES['palette.gif']())
  d = root / 'train' / 'eels'
  (d / 'palette.png').write_bytes(_MODES['palette.png']())
  (d / 'odd.png').write_bytes(_encode(_noise(37, 91, seed=5), 'PNG'))
  return str(root)


def _folder_cfg(folder, **kw):
  return _cfg(name='folder', data_dir=folder, num_classes=3, **kw)


def test_scan_folder_counts_bad_tiny_and_converted_files(folder):
  paths, labels, stats = pipeline.scan_folder(os.path.join(folder, 'train'))
  # 12 good + corrupt + truncated + tiny + 4 converted in dogs + palette.png + odd.png
  assert stats['files'] == 21 and stats['classes'] == 3
  assert stats['corrupt'] == 1 and stats['tiny'] == 1 and stats['converted'] == 5
  assert len(paths) == 19 and sorted(set(labels.tolist())) == [0, 1, 2]
  assert not any(p.endswith(('corrupt.jpg', 'tiny.png')) for p in paths)
  _, _, decoded = pipeline.scan_folder(os.path.join(folder, 'train'), decode=True)
  assert decoded['corrupt'] == 2  # a full decode also finds the truncated JPEG


def test_folder_pipeline_survives_awkward_files_and_reports_counts(folder):
  it = pipeline.create_dataset(_folder_cfg(folder, hflip=True), split='train', batch_size=4,
                               repeat=False, drop_remainder=False)
  batches = list(it)
  imgs = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert imgs.shape == (18, 32, 32, 3) and imgs.dtype == np.float32  # 19 listed - truncated
  assert -1.0 <= imgs.min() and imgs.max() <= 1.0 and labels.dtype == np.int32
  assert np.bincount(labels).tolist() == [4, 8, 6]
  assert it.stats == {'files': 21, 'corrupt': 2, 'tiny': 1, 'converted': 5, 'classes': 3}


def test_folder_pipeline_is_deterministic(folder):
  def first(seed):
    it = pipeline.create_dataset(_folder_cfg(folder, hflip=True, seed=seed), split='train',
                                 batch_size=6)
    return _take(it, 4)

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not all(np.array_equal(x['image'], z['image']) for x, z in zip(a, c))


def test_folder_shards_are_disjoint_and_cover_the_folder(folder):
  root = os.path.join(folder, 'train')
  everything, _, _ = pipeline.scan_folder(root)
  shards = [pipeline.scan_folder(root, process_index=i, process_count=3)[0] for i in range(3)]
  assert sum(len(s) for s in shards) == len(everything)
  assert sorted(p for s in shards for p in s) == sorted(everything)
  it = pipeline.create_dataset(_folder_cfg(folder), split='train', batch_size=4, process_index=1,
                               process_count=2)
  assert next(it)['image'].shape == (2, 32, 32, 3)


def test_folder_class_count_must_match_config(folder):
  with pytest.raises(ValueError, match='num_classes=5'):
    pipeline.create_dataset(_cfg(name='folder', data_dir=folder, num_classes=5), split='train',
                            batch_size=4)
  with pytest.raises(FileNotFoundError, match='val'):
    pipeline.create_dataset(_folder_cfg(folder), split='val', batch_size=4)

