"""Input pipelines: built-in shapes, image folders, TFDS ImageNet and token caches.

`create_dataset` returns an iterator of per-process batches of numpy arrays,
  images:  {'image': float32 (b, H, W, 3) in [-1, 1], 'label': int32 (b,)}
  tokens:  {'ids': int32 (b, L), 'label': int32 (b,)}
with b = batch_size // process_count, and `to_global_batch` assembles the processes' batches into
one global jax.Array. Every order and every flip is a function of cfg.seed, so a run is repeatable.
Image decoding runs in tf.data (parallel, off the training thread); TensorFlow is imported only
for the 'folder' and 'imagenet2012' pipelines and never sees a GPU.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np

from mvar_jax.data import builtin
from mvar_jax.data import images
from mvar_jax.data import token_cache

NAMES = ('builtin', 'folder', 'imagenet2012', 'tokens')
SPLITS = ('train', 'val', 'validation')
# The built-in splits are different random streams, so they never share an image.
BUILTIN_SEEDS = {'train': 0, 'val': 1}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.pgm', '.bmp', '.tif', '.tiff', '.webp',
                    '.gif')


def default_data_config() -> ml_collections.ConfigDict:
  """Data settings of the demo; real runs override name, image_size, num_classes, data_dir."""
  c = ml_collections.ConfigDict()
  c.name = 'builtin'  # one of 'builtin' | 'folder' | 'imagenet2012' | 'tokens'
  c.image_size = 32  # side of the square (ADM-cropped) images, in pixels
  c.num_classes = 10  # labels are 0..num_classes-1 (1000 for imagenet2012)
  c.data_dir = ''  # folder / tokens: root holding train/ and val/; imagenet2012: TFDS data_dir
  c.manual_dir = ''  # imagenet2012: directory holding ILSVRC2012_img_{train,val}.tar for TFDS
  c.hflip = False  # random left-right flips of training images (or flipped ids from a token cache)
  c.min_size = images.DEFAULT_MIN_SIZE  # folder/imagenet2012: skip images with a shorter side
  c.builtin_train_size = 10_000  # builtin: training examples
  c.builtin_val_size = 1_000  # builtin: validation examples
  c.shuffle_buffer = 10_000  # imagenet2012: examples in the tf.data shuffle buffer
  c.seed = 0  # seeds shuffling and flips: same seed, same batches
  c.prefetch = 2  # batches prepared ahead of the training step (-1: tf.data AUTOTUNE)
  return c


def _fail(field: str, value: Any, allowed: str):
  raise ValueError(f'data.{field}={value!r} is invalid; allowed: {allowed}')


def validate_data_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks field values before anything is built; errors name the field and the allowed values."""
  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

  if cfg.name not in NAMES:
    _fail('name', cfg.name, ' | '.join(repr(n) for n in NAMES))
  if not is_int(cfg.image_size) or cfg.image_size < 8:
    _fail('image_size', cfg.image_size, 'an int >= 8')
  if cfg.name == 'builtin' and not 16 <= cfg.image_size <= 256:
    _fail('image_size', cfg.image_size, 'an int in [16, 256] for the built-in dataset '
          '(designed for 32..64)')
  if not is_int(cfg.num_classes) or cfg.num_classes < 1:
    _fail('num_classes', cfg.num_classes, 'an int >= 1')
  if cfg.name == 'builtin' and cfg.num_classes > builtin.MAX_CLASSES:
    _fail('num_classes', cfg.num_classes, f'1..{builtin.MAX_CLASSES} for the built-in dataset')
  if cfg.name == 'imagenet2012' and cfg.num_classes != 1000:
    _fail('num_classes', cfg.num_classes, '1000 for imagenet2012')
  if cfg.name in ('folder', 'tokens') and not cfg.data_dir:
    _fail('data_dir', cfg.data_dir, f'a directory (required when name={cfg.name!r})')
  if not isinstance(cfg.data_dir, str):
    _fail('data_dir', cfg.data_dir, 'a path string')
  if not isinstance(cfg.manual_dir, str):
    _fail('manual_dir', cfg.manual_dir, "a path string ('' for none)")
  if not isinstance(cfg.hflip, bool):
    _fail('hflip', cfg.hflip, 'True | False')
  if not is_int(cfg.min_size) or cfg.min_size < 1:
    _fail('min_size', cfg.min_size, 'an int >= 1')
  for field in ('builtin_train_size', 'builtin_val_size', 'shuffle_buffer'):
    if not is_int(cfg[field]) or cfg[field] < 1:
      _fail(field, cfg[field], 'an int >= 1')
  if not is_int(cfg.seed) or cfg.seed < 0:
    _fail('seed', cfg.seed, 'an int >= 0')
  if not is_int(cfg.prefetch) or cfg.prefetch < -1:
    _fail('prefetch', cfg.prefetch, 'an int >= 0, or -1 for AUTOTUNE')
  return cfg


# ------------------------------------------------------------------------------------------------
# Iterator with statistics.


class DataIterator:
  """Iterator of per-process batches (dicts of numpy arrays).

  stats: {'files', 'corrupt', 'tiny', 'converted'} for this process; 'folder' adds files found to
    be corrupt while decoding, so the counts can grow during the first epoch.
  num_examples: examples in the whole split (all processes), before skipping bad files; None if
    unknown.
  """

  def __init__(self, batches: Iterator[dict], *, stats: Callable[[], dict],
               num_examples: int | None,
               batch_size: int):
    self._batches = batches
    self._stats = stats
    self.num_examples = num_examples
    self.batch_size = batch_size  # per process

  @property
  def stats(self) -> dict:
    return self._stats()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._batches)


def _zero_stats(files: int | None = 0) -> dict:
  return {'files': files, 'corrupt': 0, 'tiny': 0, 'converted': 0}


# ------------------------------------------------------------------------------------------------
# Public entry point.


def create_dataset(cfg: ml_collections.ConfigDict, *, split: str, batch_size: int,
                   process_index: int | None = None, process_count: int | None = None,
                   shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
                   token_expect: Mapping[str, Any] | None = None) -> DataIterator:
  """Per-process batches of split 'train' | 'val' (alias 'validation').

  batch_size: the global batch; each process yields batch_size // process_count examples.
  process_index / process_count: default to jax.process_index() / jax.process_count().
  drop_remainder: False keeps a last, smaller batch (only meaningful with repeat=False).
  token_expect: for name='tokens', metadata the caller relies on ({'L', 'vocab_size',
    'patch_nums'}); a mismatch raises naming both values.
  """
  validate_data_config(cfg)
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is invalid; allowed: {" | ".join(SPLITS)}')
  split = 'val' if split == 'validation' else split
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  local_batch = batch_size // process_count
  kw = dict(split=split, local_batch=local_batch, process_index=process_index,
            process_count=process_count, shuffle=shuffle, repeat=repeat,
            drop_remainder=drop_remainder)
  if cfg.name == 'builtin':
    return _builtin_dataset(cfg, **kw)
  if cfg.name == 'tokens':
    return _token_dataset(cfg, token_expect=token_expect, **kw)
  if cfg.name == 'folder':
    return _folder_dataset(cfg, **kw)
  return _imagenet_dataset(cfg, **kw)


def to_global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays, leading (batch) axis split over processes.

  sharding: a jax.sharding.Sharding for every leaf (e.g. NamedSharding(mesh, P('data'))), or a
    dict of them keyed like the batch.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = {k: sharding for k in batch}
  return {k: jax.make_array_from_process_local_data(sharding[k], np.asarray(v))
          for k, v in batch.items()}


def _to_unit_range(images_BHWC: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_BHWC.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def _block(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[lo, hi) of this process's contiguous block; blocks are equal so processes step together."""
  per = n // process_count
  return process_index * per, (process_index + 1) * per


def _split_dir(data_dir: str, split: str) -> str:
  names = ('train',) if split == 'train' else ('val', 'validation')
  for name in names:
    d = os.path.join(data_dir, name)
    if os.path.isdir(d):
      return d
  raise FileNotFoundError(f'no {" or ".join(names)} directory under data_dir={data_dir!r} for '
                          f'split={split!r}')


# ------------------------------------------------------------------------------------------------
# In-memory arrays: built-in images and token caches.


def _array_batches(n: int, make_batch: Callable[[np.ndarray, np.random.Generator], dict], *,
                   local_batch: int, seed: int, process_index: int, shuffle: bool, repeat: bool,
                   drop_remainder: bool) -> Iterator[dict]:
  """Batches of indices into n local examples; the order of epoch e is a function of (seed, e)."""
  if n < local_batch and drop_remainder:
    raise ValueError(f'{n} examples per process cannot fill one batch of {local_batch}')
  epoch = 0
  while True:
    rng = np.random.default_rng([seed, process_index, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % local_batch if drop_remainder else n
    for lo in range(0, stop, local_batch):
      yield make_batch(order[lo:lo + local_batch], rng)
    epoch += 1
    if not repeat:
      return


def _builtin_dataset(cfg, *, split, local_batch, process_index, process_count, shuffle, repeat,
                     drop_remainder) -> DataIterator:
  n = cfg.builtin_train_size if split == 'train' else cfg.builtin_val_size
  lo, hi = _block(n, process_index, process_count)
  # Each process renders only its own block.
  imgs_NHW3, labels_N = builtin.generate(hi - lo, image_size=cfg.image_size,
                                         num_classes=cfg.num_classes, seed=BUILTIN_SEEDS[split],
                                         start=lo)
  flip = cfg.hflip and split == 'train'

  def make_batch(idx, rng):
    x = imgs_NHW3[idx]
    if flip:
      mirror = rng.random(len(idx)) < 0.5
      x = np.where(mirror[:, None, None, None], x[:, :, ::-1], x)
    return {'image': _to_unit_range(x), 'label': labels_N[idx]}

  batches = _array_batches(hi - lo, make_batch, local_batch=local_batch, seed=cfg.seed,
                           process_index=process_index, shuffle=shuffle, repeat=repeat,
                           drop_remainder=drop_remainder)
  return DataIterator(batches, stats=lambda: _zero_stats(hi - lo), num_examples=n,
                      batch_size=local_batch)


def _token_dataset(cfg, *, split, local_batch, process_index, process_count, shuffle, repeat,
                   drop_remainder, token_expect) -> DataIterator:
  path = _split_dir(cfg.data_dir, split)
  expect = dict(token_expect or {})
  expect.setdefault('image_size', cfg.image_size)
  arrays, meta = token_cache.read_token_cache(path, expect=expect)
  labels_N = arrays['labels'].astype(np.int32)
  if len(labels_N) and labels_N.max() >= cfg.num_classes:
    raise ValueError(f'token cache {path} has label {labels_N.max()} but data.num_classes='
                     f'{cfg.num_classes}')
  flip = cfg.hflip and split == 'train'
  if flip and not meta['flip']:
    raise ValueError(f'data.hflip=True but the token cache {path} was built with flip=False; '
                     'rebuild it with flip=True or set data.hflip=False')
  lo, hi = _block(meta['count'], process_index, process_count)
  # Kept in the stored dtype (uint16): the int32 cast happens per batch.
  ids_NL = arrays['ids'][lo:hi]
  ids_flip_NL = arrays['ids_flip'][lo:hi] if flip else None
  labels_N = labels_N[lo:hi]

  def make_batch(idx, rng):
    ids = ids_NL[idx]
    if flip:
      mirror = rng.random(len(idx)) < 0.5
      ids = np.where(mirror[:, None], ids_flip_NL[idx], ids)
    return {'ids': ids.astype(np.int32), 'label': labels_N[idx]}

  batches = _array_batches(hi - lo, make_batch, local_batch=local_batch, seed=cfg.seed,
                           process_index=process_index, shuffle=shuffle, repeat=repeat,
                           drop_remainder=drop_remainder)
  return DataIterator(batches, stats=lambda: _zero_stats(hi - lo), num_examples=meta['count'],
                      batch_size=local_batch)


# ------------------------------------------------------------------------------------------------
# Image folders.


def list_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
  """All image files under root/<class>/ (recursively), sorted; labels follow sorted class names.

  Returns (paths, labels int32 (n,), class_names).
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root!r} does not exist')
  classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith('.'))
  if not classes:
    raise ValueError(f'image folder {root!r} has no class sub-folders')
  paths, labels = [], []
  for label, name in enumerate(classes):
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
      dirnames[:] = [d for d in dirnames if not d.startswith('.')]
      found += [os.path.join(dirpath, f) for f in filenames
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')]
    found.sort()
    paths += found
    labels += [label] * len(found)
  return paths, np.asarray(labels, np.int32), classes


def scan_folder(root: str, *, process_index: int = 0, process_count: int = 1,
                min_size: int = images.DEFAULT_MIN_SIZE, decode: bool = False,
                num_threads: int = 16) -> tuple[list[str], np.ndarray, dict]:
  """Lists root/<class>/ files, keeps this process's share, and drops unusable files.

  Every process lists the same sorted files and keeps every process_count-th one, so the shares
  are disjoint and cover the folder. Headers are read to drop non-images and images whose short
  side < min_size and to count non-RGB files; decode=True decodes every file too (also catches
  truncated files up front, at the cost of a full pass).
  Returns (paths, labels int32 (n,), stats {'files', 'corrupt', 'tiny', 'converted', 'classes'}).
  """
  all_paths, all_labels, classes = list_folder(root)
  paths = all_paths[process_index::process_count]
  labels = all_labels[process_index::process_count]

  def check(path):
    try:
      if decode:
        _, converted = images.open_rgb(path, min_size=min_size)
        return 'ok', converted
      (w, h), mode = images.probe(path)
    except images.TinyImage:
      return 'tiny', False
    except images.BadImage:
      return 'corrupt', False
    return ('tiny' if min(w, h) < min_size else 'ok'), mode != 'RGB'

  # File opening is I/O bound (often on network storage): threads overlap the latency.
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(check, paths))
  keep = [status == 'ok' for status, _ in results]
  stats = _zero_stats(len(paths))
  stats['classes'] = len(classes)
  for status, converted in results:
    if status != 'ok':
      stats[status] += 1
    elif converted:
      stats['converted'] += 1
  logging.info('folder %s (process %d of %d): %d files in %d classes; skipped %d corrupt, %d tiny '
               '(< %d px); %d will be converted to RGB', root, process_index, process_count,
               len(paths), len(classes), stats['corrupt'], stats['tiny'], min_size,
               stats['converted'])
  return [p for p, k in zip(paths, keep) if k], labels[np.asarray(keep, bool)], stats


class _DecodeFailures:
  """Files found bad while decoding, counted once each however many epochs revisit them."""

  def __init__(self):
    self._lock = threading.Lock()
    self.bad: dict[str, set] = {'corrupt': set(), 'tiny': set()}

  def add(self, kind: str, key) -> bool:
    """Records a bad file; True the first time it is seen."""
    with self._lock:
      new = key not in self.bad[kind]
      self.bad[kind].add(key)
      return new

  def counts(self) -> dict:
    with self._lock:
      return {k: len(v) for k, v in self.bad.items()}


_TF = None


def _tf():
  """TensorFlow, imported on first use with every GPU hidden from it (JAX owns the accelerator)."""
  global _TF
  if _TF is None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # TF was initialised elsewhere first; its devices can no longer change
      logging.warning('TensorFlow was initialised before mvar_jax.data; it may hold GPU memory')
    _TF = tf
  return _TF


def _decode_crop_fn(image_size: int, min_size: int, failures: _DecodeFailures):
  """numpy function: (encoded bytes or path, key) -> (uint8 (S, S, 3), ok)."""
  blank = np.zeros((image_size, image_size, 3), np.uint8)

  def fn(src, key, is_path):
    key = key.decode() if isinstance(key, bytes) else str(key)
    src = src.decode() if is_path else src
    try:
      img, _ = images.open_rgb(src, name=key, min_size=min_size)
      return images.center_crop_adm(img, image_size), True
    except images.TinyImage:
      failures.add('tiny', key)
    except images.BadImage as e:
      if failures.add('corrupt', key):
        logging.warning('skipping %s', e)
    return blank, False

  return fn


def _image_tf_pipeline(ds, *, cfg, is_path: bool, failures: _DecodeFailures, shuffle_buffer: int,
                       local_batch: int, shuffle: bool, repeat: bool, drop_remainder: bool,
                       flip: bool) -> Iterator[dict]:
  """(src, key, label) dataset -> batches of {'image', 'label'}; deterministic given cfg.seed."""
  tf = _tf()
  if shuffle:
    ds = ds.shuffle(shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  # The running element number seeds each flip, so flips do not depend on thread timing.
  ds = ds.enumerate()
  decode = _decode_crop_fn(cfg.image_size, cfg.min_size, failures)
  size, seed = cfg.image_size, cfg.seed

  def load(k, elem):
    src, key, label = elem
    img, ok = tf.numpy_function(lambda s, n: decode(s, n, is_path), [src, key],
                                [tf.uint8, tf.bool])
    img = tf.ensure_shape(img, (size, size, 3))
    if flip:
      u = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), k]))
      img = tf.cond(u < 0.5, lambda: tf.reverse(img, [1]), lambda: img)
    return {'image': img, 'label': tf.cast(label, tf.int32), 'ok': tf.ensure_shape(ok, ())}

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.filter(lambda e: e['ok'])
  ds = ds.map(lambda e: {'image': e['image'], 'label': e['label']})
  ds = ds.batch(local_batch, drop_remainder=drop_remainder)
  ds = ds.map(lambda b: {'image': tf.cast(b['image'], tf.float32) / 127.5 - 1.0,
                         'label': b['label']})
  ds = ds.prefetch(tf.data.AUTOTUNE if cfg.prefetch < 0 else cfg.prefetch)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return iter(ds.as_numpy_iterator())


def _folder_dataset(cfg, *, split, local_batch, process_index, process_count, shuffle, repeat,
                    drop_remainder) -> DataIterator:
  tf = _tf()
  root = _split_dir(cfg.data_dir, split)
  paths, labels, scan_stats = scan_folder(root, process_index=process_index,
                                          process_count=process_count, min_size=cfg.min_size)
  if scan_stats['classes'] != cfg.num_classes:
    raise ValueError(f'data.num_classes={cfg.num_classes} but {root} has '
                     f'{scan_stats["classes"]} class folders')
  if not paths:
    raise ValueError(f'no usable images in {root} for process {process_index}')
  failures = _DecodeFailures()
  ds = tf.data.Dataset.from_tensor_slices((paths, paths, labels))
  # File names are small: shuffle the whole list, not a window of it.
  batches = _image_tf_pipeline(ds, cfg=cfg, is_path=True, failures=failures,
                               shuffle_buffer=len(paths), local_batch=local_batch, shuffle=shuffle,
                               repeat=repeat, drop_remainder=drop_remainder,
                               flip=cfg.hflip and split == 'train')

  def stats():
    s = dict(scan_stats)
    for k, v in failures.counts().items():
      s[k] += v
    return s

  num_examples = len(list_folder(root)[0]) if process_count > 1 else scan_stats['files']
  return DataIterator(batches, stats=stats, num_examples=num_examples, batch_size=local_batch)


# ------------------------------------------------------------------------------------------------
# TFDS ImageNet.


def _imagenet_dataset(cfg, *, split, local_batch, process_index, process_count, shuffle, repeat,
                      drop_remainder) -> DataIterator:
  tf = _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('imagenet2012', data_dir=cfg.data_dir or None)
  if not builder.is_prepared():
    if process_count > 1:
      # Several hosts preparing the same directory would race; prepare once beforehand.
      raise RuntimeError(f'imagenet2012 is not prepared under data_dir={cfg.data_dir!r}; run '
                         'create_dataset once with a single process (or `tfds build '
                         'imagenet2012 --manual_dir=...`) first')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=cfg.manual_dir or None))
  tfds_split = 'train' if split == 'train' else 'validation'
  # Known once prepared (None only for mocked builders in tests).
  splits = builder.info.splits
  num_examples = splits[tfds_split].num_examples if tfds_split in splits else None
  # Each host reads its own 1/process_count of the records (disjoint, together complete).
  host_split = tfds.even_splits(tfds_split, n=process_count, drop_remainder=False)[process_index]
  ds = builder.as_dataset(
      split=host_split, shuffle_files=shuffle,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=cfg.seed))
  ds = ds.map(lambda e: (e['image'], e['file_name'], e['label']))
  failures = _DecodeFailures()
  batches = _image_tf_pipeline(ds, cfg=cfg, is_path=False, failures=failures,
                               shuffle_buffer=cfg.shuffle_buffer, local_batch=local_batch,
                               shuffle=shuffle, repeat=repeat, drop_remainder=drop_remainder,
                               flip=cfg.hflip and split == 'train')

  def stats():
    s = _zero_stats(None if num_examples is None else num_examples // process_count)
    for k, v in failures.counts().items():
      s[k] += v
    return s

  return DataIterator(batches, stats=stats, num_examples=num_examples, batch_size=local_batch)
