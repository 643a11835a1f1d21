"""Training batches addressed by step, and validation batches, for the trainers.

    source = make_train_source(config.data, global_batch, token_expect=...)
    local_batch = source.batch(step)            # this process's rows of global batch `step`

Exact resume rests on `StepIndexedSource`: the GLOBAL batch of step g is a function of
(seed, g) alone; process p reads rows [p * b, (p + 1) * b) of it. A run on 1 process and
the same run on 8 therefore see the same examples at every step, and a run killed and
restarted (with any process count) continues the same sequence. Streaming data (tf.data)
cannot be indexed by step: `IteratorSource` restarts its pipeline at the resumed epoch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from mvar_jax.layout import ScaleLayout


class StepIndexedSource:
  """Batches as a pure function of (seed, step) over the whole split held in memory.

  Epoch e visits the split in the order permutation(seed, e); an epoch has
  ceil(n / B) global batches (B = global batch) and its last batch is filled from the
  start of the same permutation (upstream's fill_last). Step g reads batch
  g % steps_per_epoch of epoch g // steps_per_epoch. `transform(rows, u_b)` gets this
  process's rows and one uniform draw per row, taken from a generator seeded with
  (seed, epoch, batch) over the global batch, so augmentation is process-count free too.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], global_batch: int, *, seed: int,
               transform: Callable[[dict, np.ndarray], dict] | None = None,
               process_index: int = 0, process_count: int = 1):
    self.arrays = dict(arrays)
    sizes = {len(v) for v in self.arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f'arrays must share their first dimension, got {sizes}')
    self.num_examples = sizes.pop()
    if self.num_examples == 0:
      raise ValueError('the training split is empty')
    if global_batch < 1 or global_batch % process_count:
      raise ValueError(f'global batch {global_batch} must be a positive multiple of the '
                       f'process count {process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    self.global_batch, self.seed = int(global_batch), int(seed)
    self.local_batch = self.global_batch // process_count
    self.process_index = process_index
    self.transform = transform
    self.steps_per_epoch = max(1, math.ceil(self.num_examples / self.global_batch))
    self._epoch, self._order = None, None

  def global_indices(self, step: int) -> np.ndarray:
    """(global_batch,) example indices of step `step` (the same for every process)."""
    epoch, i = divmod(int(step), self.steps_per_epoch)
    if epoch != self._epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      reps = math.ceil(self.steps_per_epoch * self.global_batch / self.num_examples)
      self._order = np.tile(perm, reps)[:self.steps_per_epoch * self.global_batch]
      self._epoch = epoch
    return self._order[i * self.global_batch:(i + 1) * self.global_batch]

  def _rows(self) -> slice:
    return slice(self.process_index * self.local_batch,
                 (self.process_index + 1) * self.local_batch)

  def indices(self, step: int) -> np.ndarray:
    """(local_batch,) indices this process reads at step `step`."""
    return self.global_indices(step)[self._rows()]

  def batch(self, step: int) -> dict:
    idx = self.indices(step)
    out = {k: v[idx] for k, v in self.arrays.items()}
    if self.transform is None:
      return out
    epoch, i = divmod(int(step), self.steps_per_epoch)
    u = np.random.default_rng([self.seed, epoch, i, 1]).random(self.global_batch)[self._rows()]
    return self.transform(out, u)


class IteratorSource:
  """A streaming (tf.data) pipeline: batches in the iterator's order, not indexable by step.

  Resuming rebuilds the pipeline for the epoch of the resumed step, with the shuffle
  seed data.seed + epoch, and starts at the beginning of that epoch's fresh shuffle:
  the resumed run sees the same data distribution, not the same batch sequence.
  """

  def __init__(self, make_iterator: Callable[[int], Iterator[dict]], *, global_batch: int):
    self.make_iterator = make_iterator
    self._it = make_iterator(0)
    self.num_examples = int(self._it.num_examples)
    self.local_batch = global_batch // jax.process_count()
    self.steps_per_epoch = max(1, math.ceil(self.num_examples / global_batch))
    self._next_step = 0

  def batch(self, step: int) -> dict:
    if step != self._next_step:
      epoch = step // self.steps_per_epoch
      logging.info('data: restarting the pipeline at epoch %d (step %d) with a fresh shuffle',
                   epoch, step)
      self._it = self.make_iterator(epoch)
    self._next_step = step + 1
    return next(self._it)


def _pipeline():
  from mvar_jax.data import pipeline  # imported late: it may pull in TensorFlow
  return pipeline


def token_expectation(config) -> dict:
  """What a token cache must match: the model's pyramid and vocabulary."""
  layout = ScaleLayout(tuple(config.model.patch_nums))
  return {'L': layout.total_len, 'vocab_size': int(config.model.vocab_size),
          'patch_nums': tuple(layout.patch_nums)}


def _unit_range(images_uint8):
  return images_uint8.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def make_train_source(data, global_batch: int, *, token_expect: Mapping[str, Any] | None = None):
  """StepIndexedSource for in-memory data ('builtin', 'tokens'), else an IteratorSource.

  data: the config's `data` section; token_expect: see `token_expectation` ('tokens' only).
  """
  from mvar_jax.data import builtin, token_cache
  pipeline = _pipeline()
  d = data
  pipeline.validate_data_config(d)
  pc, pi = jax.process_count(), jax.process_index()
  if d.name == 'builtin':
    # Every process generates the whole split (it is small) and reads its rows of each batch.
    images, labels = builtin.generate(int(d.builtin_train_size), image_size=d.image_size,
                                      num_classes=d.num_classes,
                                      seed=pipeline.BUILTIN_SEEDS['train'], start=0)

    def transform(b, u):
      x = b['image']
      if d.hflip:
        x = np.where((u < 0.5)[:, None, None, None], x[:, :, ::-1], x)
      return {'image': _unit_range(x), 'label': b['label']}
    return StepIndexedSource({'image': images, 'label': labels}, global_batch, seed=d.seed,
                             transform=transform, process_index=pi, process_count=pc)
  if d.name == 'tokens':
    # The pipeline's own rule for where a split lives under data_dir.
    path = pipeline._split_dir(d.data_dir, 'train')  # pylint: disable=protected-access
    arrays, meta = token_cache.read_token_cache(
        path, expect=dict(token_expect or {}, image_size=d.image_size))
    if d.hflip and not meta['flip']:
      raise ValueError(f'data.hflip=True but the token cache {path} was built with flip=False')
    if len(arrays['labels']) and arrays['labels'].max() >= d.num_classes:
      raise ValueError(f'token cache {path} has label {arrays["labels"].max()} but '
                       f'data.num_classes={d.num_classes}')
    rows = {'ids': arrays['ids'], 'label': arrays['labels'].astype(np.int32)}
    if d.hflip:
      rows['ids_flip'] = arrays['ids_flip']

    def transform(b, u):
      ids = b['ids']
      if d.hflip:
        ids = np.where((u < 0.5)[:, None], b['ids_flip'], ids)
      return {'ids': ids.astype(np.int32), 'label': b['label']}
    return StepIndexedSource(rows, global_batch, seed=d.seed, transform=transform,
                             process_index=pi, process_count=pc)

  def make_iterator(epoch: int):
    dd = d.copy_and_resolve_references()
    dd.seed = int(d.seed) + epoch
    return pipeline.create_dataset(dd, split='train', batch_size=int(global_batch))
  return IteratorSource(make_iterator, global_batch=global_batch)


def eval_batches(config) -> Iterator[dict]:
  """Local validation batches padded to the local batch, with 'mask' (B,) marking real rows."""
  pipeline = _pipeline()
  batch_size = int(config.train.batch_size)
  local = batch_size // jax.process_count()
  expect = token_expectation(config) if config.data.name == 'tokens' else None
  try:
    it = pipeline.create_dataset(config.data, split='val', batch_size=batch_size, shuffle=False,
                                 repeat=False, drop_remainder=False, token_expect=expect)
  except FileNotFoundError as e:
    logging.warning('no validation split (%s): skipping evaluation', e)
    return
  for b, out in enumerate(it):
    if 0 <= config.train.eval_batches <= b:
      return
    rows = len(out['label'])
    if rows < local:  # pad the last batch (every process must contribute equal shapes)
      out = {k: np.concatenate([v, np.repeat(v[-1:], local - rows, 0)]) for k, v in out.items()}
    out['mask'] = (np.arange(local) < rows).astype(np.float32)
    yield out
