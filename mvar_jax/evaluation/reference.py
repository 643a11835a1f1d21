"""Reference statistics: ADM's reference batches, or computed from a dataset and cached.

    ref = reference.load('VIRTUAL_imagenet256_labeled.npz', extractor)   # ADM's file
    ref = reference.from_dataset(data_cfg, 'val', extractor, cache='ref_val.npz')
    ref.mu, ref.sigma      # pool statistics (FID), float64
    ref.mu_s, ref.sigma_s  # spatial statistics (sFID)
    ref.pool               # (N, 2048) pool features of the reference images (precision/recall)

ADM's reference batch npz holds `arr_0` (10,000 uint8 images) and `mu`, `sigma`, `mu_s`,
`sigma_s` precomputed by its TF graph over the whole dataset: FID uses those statistics,
precision/recall the features of `arr_0`. Our cache holds the same statistics plus the
`pool` features instead of the images, and the preprocessing they were computed with.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from mvar_jax import atomic_file
from mvar_jax.evaluation import metrics

STAT_KEYS = ('mu', 'sigma', 'mu_s', 'sigma_s')


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
  mu: np.ndarray  # (2048,) float64
  sigma: np.ndarray  # (2048, 2048) float64
  mu_s: np.ndarray  # (2023,) float64
  sigma_s: np.ndarray  # (2023, 2023) float64
  pool: np.ndarray  # (N, 2048) float32, for precision/recall
  preprocess: str  # the Inception preprocessing the statistics come from

  @property
  def num_images(self) -> int:
    return len(self.pool)


def from_features(feats: dict[str, np.ndarray], preprocess: str) -> Reference:
  """Statistics of extracted features ({'pool', 'spatial', ...})."""
  mu, sigma = metrics.statistics(feats['pool'])
  mu_s, sigma_s = metrics.statistics(feats['spatial'])
  return Reference(mu, sigma, mu_s, sigma_s, np.asarray(feats['pool'], np.float32), preprocess)


def save(ref: Reference, path: str) -> None:
  """Writes the cache npz (process 0 only, atomically)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = dict(mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s, sigma_s=ref.sigma_s, pool=ref.pool,
                preprocess=np.asarray(ref.preprocess))
  atomic_file.write_atomically(path, lambda f: np.savez(f, **arrays))


def load(path: str, extractor=None) -> Reference:
  """A reference npz: ADM's batch (needs `extractor` for arr_0's features) or our cache."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'reference file not found: {path} (an ADM reference batch such as '
                            'VIRTUAL_imagenet256_labeled.npz, or a cache written by this module)')
  with np.load(path) as npz:
    keys = set(npz.files)
    has_stats = all(k in keys for k in STAT_KEYS)
    if 'pool' in keys:  # our cache
      if not has_stats:
        raise ValueError(f'{path}: a cache needs {STAT_KEYS} beside pool, has {sorted(keys)}')
      preprocess = str(npz['preprocess']) if 'preprocess' in keys else 'adm'
      ref = Reference(*(npz[k].astype(np.float64) for k in STAT_KEYS),
                      npz['pool'].astype(np.float32), preprocess)
      _check_preprocess(ref, extractor, path)
      return ref
    if 'arr_0' not in keys:
      raise ValueError(f'{path}: expected an ADM reference batch (arr_0 images, optionally '
                       f'mu/sigma/mu_s/sigma_s) or a cache (pool + statistics); has {sorted(keys)}')
    if extractor is None:
      raise ValueError(f'{path} holds images (arr_0): pass an extractor to compute their features')
    stats = [npz[k].astype(np.float64) for k in STAT_KEYS] if has_stats else None
  from mvar_jax.evaluation import features
  images = features.NpzImages(path, 'arr_0')  # streamed: 10k images are ~2 GB
  try:
    feats = extractor.of_array(images)
  finally:
    images.close()
  if stats is None:
    return from_features(feats, extractor.config.preprocess)
  # ADM's statistics come from its TF graph: only preprocess='adm' reproduces them.
  ref = Reference(*stats, np.asarray(feats['pool'], np.float32), 'adm')
  _check_preprocess(ref, extractor, path)
  return ref


def _check_preprocess(ref: Reference, extractor, path: str) -> None:
  if extractor is not None and extractor.config.preprocess != ref.preprocess:
    raise ValueError(f'{path}: reference statistics were computed with preprocess='
                     f'{ref.preprocess!r}, the Inception network uses '
                     f'{extractor.config.preprocess!r}; FIDs across the two are not comparable')


def dataset_batches(data_cfg, split: str, batch_size: int, num_images: int = -1):
  """uint8 (b, H, W, 3) batches of this process's share of a data split, in file order."""
  from mvar_jax.data import pipeline
  it = pipeline.create_dataset(data_cfg, split=split, batch_size=batch_size, shuffle=False,
                               repeat=False, drop_remainder=False)
  limit = None if num_images < 0 else -(-num_images // jax.process_count())
  seen = 0
  for batch in it:
    images = np.clip(np.round((batch['image'] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if limit is not None:
      images = images[:max(limit - seen, 0)]
    if not len(images):
      return
    seen += len(images)
    yield images


def from_dataset(data_cfg, split: str, extractor, *, num_images: int = -1,
                 cache: str = '') -> Reference:
  """Statistics of a data split (builtin, folder, imagenet2012), reused from `cache` if there."""
  if cache and os.path.exists(cache):
    return load(cache, extractor)
  batches = dataset_batches(data_cfg, split, extractor.global_batch, num_images)
  ref = from_features(extractor.of_batches(batches, total=num_images if num_images > 0 else None),
                      extractor.config.preprocess)
  if cache:
    save(ref, cache)
  return ref
