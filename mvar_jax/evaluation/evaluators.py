"""Evaluators: small objects built from config whose `run(params)` yields (name, value) pairs.

    evals = evaluators.from_config(config, model=model, tokenizer=tok, tok_params=tok_params,
                                   eval_fn=eval_fn, eval_batches=eval_batches, workdir=workdir)
    metrics = evaluators.run_all(evals, params, step, writer)             # those due at `step`
    metrics = evaluators.run_all(evals, params, step, writer, final=True) # every one

One interface serves the trainer (periodic and final evaluations) and the CLI:
- `ValidationLoss`: per-scale teacher-forced loss and accuracy on the validation split
  (names as the trainer's: 'val/loss', 'val_loss/s09_16x16', ...);
- `SampleFID`: samples `num_images` with a balanced label list through the sampler and
  scores them (FID, sFID, IS, precision, recall) against a reference;
- `SamplesFileFID`: the same metrics of a samples.npz (`python -m mvar_jax.evaluate`).
Each is wrapped in a `Scheduled` (name, evaluator, every, prefix); `every` = 0 runs it only
in the final evaluation, which a finished run does on every start (big_vision's rule), so a
run that was stopped after its last checkpoint still reports its final numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import jax
import numpy as np


class Evaluator(Protocol):

  def run(self, params) -> Iterator[tuple[str, float]]:
    """Yields (name, value) pairs for the given model parameters."""


@dataclasses.dataclass(frozen=True)
class Scheduled:
  name: str  # for logs
  evaluator: Evaluator
  every: int  # steps between runs; 0 = only in the final evaluation
  prefix: str = ''  # prepended to every name the evaluator yields

  def due(self, step: int, *, final: bool) -> bool:
    return final or (self.every > 0 and step % self.every == 0)


def any_due(evaluators: Sequence[Scheduled], step: int, *, final: bool = False) -> bool:
  return any(e.due(step, final=final) for e in evaluators)


def run_all(evaluators: Sequence[Scheduled], params, step: int, writer=None, *,
            final: bool = False) -> dict[str, float]:
  """Runs the evaluators due at `step` (all if `final`); writes and returns their scalars."""
  out: dict[str, float] = {}
  for e in evaluators:
    if not e.due(step, final=final):
      continue
    t0 = time.time()
    for name, value in e.evaluator.run(params):
      out[e.prefix + name] = float(value)
    logging.info('evaluator %s at step %d: %.1f s', e.name, step, time.time() - t0)
  if out and writer is not None:
    writer.write_scalars(step, out)
  return out


# ----------------------------------------------------------------------------- validation loss

class ValidationLoss:
  """Per-scale loss and accuracy of `eval_fn(params, batch)` sums over `batches()`.

  eval_fn returns {'nll_K', 'correct_K', 'count_K'} (K,) sums (the trainer's eval step);
  batches() returns a fresh iterable of global batches each run.
  """

  def __init__(self, eval_fn: Callable[[Any, Any], dict], batches: Callable[[], Iterable],
               patch_nums: Sequence[int], prefix: str = 'val'):
    self.eval_fn, self.batches, self.prefix = eval_fn, batches, prefix
    from mvar_jax.layout import ScaleLayout
    self.layout = ScaleLayout(tuple(patch_nums))

  def run(self, params):
    from mvar_jax import train  # the trainer's Accumulator names the per-scale metrics
    acc = train.Accumulator(self.layout.num_scales)
    for batch in self.batches():
      acc.add(jax.device_get(self.eval_fn(params, batch)))
    if acc.count.sum():
      yield from acc.summary(self.prefix, self.layout).items()


# ----------------------------------------------------------------------------- sample FID

def balanced_labels(num_images: int, num_classes: int) -> np.ndarray:
  """0, 1, ..., C-1, 0, 1, ...: every class equally often (50 per class at 50k / 1000)."""
  return (np.arange(num_images) % num_classes).astype(np.int32)


def mvar_sample_fn(model, tokenizer, tok_params, *, cfg: float, top_k: int, top_p: float):
  """sample_fn(params, labels_B, key) -> uint8 (B, H, W, 3), through mvar_jax.sampling."""
  from mvar_jax import sampling

  def sample_fn(params, labels_B, key):
    variables = params if 'params' in params else {'params': params}
    out = sampling.sample(model, variables, tokenizer, tok_params, key=key, labels=labels_B,
                          cfg=cfg, top_k=top_k, top_p=top_p)
    images = np.asarray(jax.device_get(out.images_BHW3))
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)  # as samples.npz

  return sample_fn


class SampleFID:
  """FID, sFID, IS, precision and recall of `num_images` samples against a reference."""

  def __init__(self, *, sample_fn: Callable, extractor, reference, num_images: int,
               num_classes: int, batch_size: int, seed: int = 0):
    if num_images < 4:
      raise ValueError(f'eval.fid_images must be >= 4 (k-NN radii with k=3), got {num_images}')
    if batch_size < 1:
      raise ValueError(f'eval.fid_batch_size must be >= 1, got {batch_size}')
    self.sample_fn, self.extractor, self.reference = sample_fn, extractor, reference
    self.num_images, self.num_classes, self.batch_size = num_images, num_classes, batch_size
    self.seed = seed  # the same labels and noise every run: evaluations differ by the model only

  def _local_batches(self, params):
    labels = balanced_labels(self.num_images, self.num_classes)
    key = jax.random.key(self.seed)
    p, n_proc = jax.process_index(), jax.process_count()
    for b, lo in enumerate(range(0, self.num_images, self.batch_size)):
      lab = labels[lo:lo + self.batch_size]
      padded = np.concatenate([lab, np.repeat(lab[-1:], self.batch_size - len(lab))])
      images = self.sample_fn(params, padded, jax.random.fold_in(key, b))[:len(lab)]
      # Every process sampled the same batch; each extracts the features of its share.
      yield np.array_split(images, n_proc)[p]

  def run(self, params):
    from mvar_jax import evaluate
    feats = self.extractor.of_batches(self._local_batches(params), total=self.num_images)
    results = evaluate.evaluate_features(feats, self.reference)
    for name in evaluate.METRICS:
      yield name, results[name]


class SamplesFileFID:
  """The same metrics of the images in a samples.npz (arr_0); `params` is not used.

  What `python -m mvar_jax.evaluate` runs: the file is streamed, never loaded whole.
  """

  def __init__(self, path: str, *, extractor, reference, num_images: int = -1):
    self.path, self.extractor, self.reference = path, extractor, reference
    self.num_images = num_images  # the first N images; -1 = all

  def run(self, params=None):
    del params
    from mvar_jax import evaluate
    from mvar_jax.evaluation import features
    images = features.NpzImages(self.path, 'arr_0')
    try:
      n = len(images) if self.num_images < 0 else min(self.num_images, len(images))
      feats = self.extractor.of_array(images if n == len(images) else _Head(images, n))
    finally:
      images.close()
    yield from evaluate.evaluate_features(feats, self.reference).items()


class _Head:
  """The first n rows of a sliceable array."""

  def __init__(self, arr, n: int):
    self.arr, self.n = arr, n

  def __len__(self):
    return self.n

  def __getitem__(self, rows: slice):
    lo, hi, _ = rows.indices(self.n)
    return self.arr[lo:hi]


# ----------------------------------------------------------------------------- from config

def validate_eval_config(e) -> None:
  """Checks config.eval before anything is loaded; errors name the field and the range."""
  from mvar_jax.evaluation import inception
  for name, lo in (('fid_every', 0), ('fid_images', 4), ('fid_batch_size', 1),
                   ('inception_batch_size', 1)):
    if int(e[name]) != e[name] or e[name] < lo:
      raise ValueError(f'eval.{name} must be an integer >= {lo}, got {e[name]!r}')
  if e.preprocess not in inception.PREPROCESS:
    raise ValueError(f'eval.preprocess must be one of {inception.PREPROCESS}, got {e.preprocess!r}')
  if e.precision not in inception.PRECISIONS:
    raise ValueError(f'eval.precision must be one of {tuple(inception.PRECISIONS)}, '
                     f'got {e.precision!r}')


def fid_from_config(config, *, sample_fn: Callable, workdir: str = '') -> Scheduled | None:
  """The SampleFID of `config.eval` (None when eval.inception is empty: FID is off)."""
  e = config.get('eval')
  if e is None or not e.inception:
    return None
  validate_eval_config(e)
  from mvar_jax.evaluation import features, inception, reference
  net_cfg = inception.InceptionConfig(preprocess=e.preprocess, precision=e.precision).validate()
  extractor = features.FeatureExtractor(inception.load_params(e.inception), net_cfg,
                                        per_device_batch=e.inception_batch_size)
  if e.reference:
    ref = reference.load(e.reference, extractor)
  else:  # the validation split of the training data, computed once and cached in the workdir
    cache = e.reference_cache or (os.path.join(workdir, 'fid_reference.npz') if workdir else '')
    ref = reference.from_dataset(config.data, 'val', extractor, num_images=e.reference_images,
                                 cache=cache)
  fid = SampleFID(sample_fn=sample_fn, extractor=extractor, reference=ref,
                  num_images=e.fid_images, num_classes=config.model.num_classes,
                  batch_size=e.fid_batch_size, seed=config.seed)
  return Scheduled('fid', fid, every=e.fid_every, prefix='eval/')


def from_config(config, *, model, tokenizer, tok_params, eval_fn=None, eval_batches=None,
                workdir: str = '') -> list[Scheduled]:
  """The trainer's evaluators: validation loss (train.eval_every) and, if configured, FID.

  eval_fn(params, batch) -> per-scale sums; eval_batches() -> global validation batches.
  """
  out = []
  if eval_fn is not None and eval_batches is not None:
    out.append(Scheduled('val_loss', ValidationLoss(eval_fn, eval_batches,
                                                    config.model.patch_nums),
                         every=int(config.train.eval_every)))
  s = config.sample
  fid = fid_from_config(config, workdir=workdir, sample_fn=mvar_sample_fn(
      model, tokenizer, tok_params, cfg=s.cfg, top_k=s.top_k, top_p=s.top_p))
  if fid is not None:
    out.append(fid)
  return out
