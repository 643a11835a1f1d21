"""Token cache: encode a dataset to multi-scale token ids once, then train from the ids.

Encoding every image through the VQ-VAE encoder each step costs about as much as the transformer's
forward pass; the ids of a fixed (ADM-cropped) image never change, so we store them. Like the
official cache we can also store the ids of the mirrored image, which keeps h-flip augmentation.

Layout of a cache directory (one per split):
  shard-PPPPP-KKKKK.npz      'ids' (n, L) uint16 (int32 when vocab > 65536), 'labels' (n,) int32,
                             and 'ids_flip' (n, L) when built with flip=True; P = process, K = shard
  meta-PPPPP-of-CCCCC.json   one per process: L, vocab_size, patch_nums, count, flip, shards, ...
Every file is written to a temporary name and moved into place with os.replace, and a process's
metadata is written last (with the byte size of each shard), so a cache is either complete or
reported as missing, never half-read. A part left half-written by a crash (shards or temporary
files but no metadata, or metadata whose shards are missing or truncated) is detected by
`build_token_cache`, removed and rebuilt; `is_complete(path)` tells whether a cache can be read.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

from mvar_jax import atomic_file

FORMAT_VERSION = 1
_META = 'meta-{:05d}-of-{:05d}.json'
_SHARD = 'shard-{:05d}-{:05d}.npz'
# Fields every process's metadata must agree on.
_SHARED_FIELDS = ('format_version', 'L', 'vocab_size', 'patch_nums', 'flip', 'image_size',
                  'process_count')


def ids_dtype(vocab_size: int) -> np.dtype:
  """uint16 halves the cache (ImageNet at 256 px: 1.7 GB instead of 3.5 GB) whenever ids fit."""
  return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _own_files(path: str, process_index: int) -> list[str]:
  """Shards and temporary files of one process's part (not its metadata)."""
  p = f'{process_index:05d}'
  return (glob.glob(os.path.join(path, f'shard-{p}-*.npz')) +
          glob.glob(os.path.join(path, f'.shard-{p}-*.tmp-*')) +
          glob.glob(os.path.join(path, f'.meta-{p}-of-*.tmp-*')))


def _part_problem(path: str, meta_path: str) -> str | None:
  """Why one process's part cannot be read (None: it is complete)."""
  if not os.path.exists(meta_path):
    return 'no metadata (the build was interrupted)'
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    shards = list(meta['shards'])
    sizes = meta.get('shard_bytes')  # absent in caches built before sizes were recorded
    if sizes is not None and len(sizes) != len(shards):
      raise ValueError(f'{len(shards)} shards but {len(sizes)} sizes')
  except (ValueError, KeyError, TypeError) as e:
    return f'unreadable metadata ({e})'
  for i, name in enumerate(shards):
    shard = os.path.join(path, name)
    if not os.path.exists(shard):
      return f'{name} is missing'
    if sizes is not None and os.path.getsize(shard) != sizes[i]:
      return f'{name} has {os.path.getsize(shard)} bytes, the metadata says {sizes[i]}'
  return None


def is_complete(path: str) -> bool:
  """True when every process's part of the cache at `path` is present and whole."""
  metas = glob.glob(os.path.join(path, 'meta-*-of-*.json'))
  if not metas:
    return False
  try:
    with open(metas[0]) as f:
      count = json.load(f)['process_count']
  except (ValueError, KeyError, TypeError):
    return False
  return all(_part_problem(path, os.path.join(path, _META.format(i, count))) is None
             for i in range(count))


def build_token_cache(batches_iter: Iterable[Mapping[str, np.ndarray]],
                      encode_fn: Callable[[np.ndarray], Any], path: str, *, num_scales_len: int,
                      vocab_size: int, patch_nums: Sequence[int] | None = None,
                      flip: bool = False, image_size: int | None = None,
                      shard_size: int = 10_000, process_index: int = 0, process_count: int = 1,
                      overwrite: bool = False) -> dict:
  """Encodes every batch and writes this process's part of the cache under `path`.

  batches_iter: dicts with 'image' float32 (B, H, W, 3) in [-1, 1] and 'label' int (B,); use a
    pipeline with shuffle=False, repeat=False, drop_remainder=False so every example is seen once.
  encode_fn: images float32 (B, H, W, 3) -> ids int (B, num_scales_len), all scales concatenated.
  flip: also store the ids of the left-right mirrored images (doubles the encoding work).
  Returns this process's metadata dict.
  """
  if patch_nums is not None and sum(p * p for p in patch_nums) != num_scales_len:
    raise ValueError(f'num_scales_len={num_scales_len} but patch_nums={tuple(patch_nums)} give '
                     f'L={sum(p * p for p in patch_nums)}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  os.makedirs(path, exist_ok=True)
  meta_path = os.path.join(path, _META.format(process_index, process_count))
  own = _own_files(path, process_index)
  if os.path.exists(meta_path) or own:
    problem = _part_problem(path, meta_path)
    if problem is None and not overwrite:
      raise FileExistsError(f'token cache {path} already holds a part for process {process_index}; '
                            'pass overwrite=True to rebuild it')
    if problem is not None:
      logging.warning('token cache %s: the part of process %d is half-written (%s), left by an '
                      'interrupted build: removing it (%d files) and rebuilding', path,
                      process_index, problem, len(own))
    # Metadata first: an interrupted rebuild must not look complete.
    for f in [meta_path] + own:
      if os.path.exists(f):
        os.remove(f)

  dtype = ids_dtype(vocab_size)
  buf: dict[str, list[np.ndarray]] = {'ids': [], 'labels': []}
  if flip:
    buf['ids_flip'] = []
  shards: list[str] = []
  shard_bytes: list[int] = []
  count, buffered, t0 = 0, 0, time.time()

  def encode(images_BHWC) -> np.ndarray:
    ids_BL = np.asarray(encode_fn(images_BHWC))
    if ids_BL.shape != (images_BHWC.shape[0], num_scales_len):
      raise ValueError(f'encode_fn returned shape {ids_BL.shape}, expected '
                       f'(batch={images_BHWC.shape[0]}, num_scales_len={num_scales_len})')
    if ids_BL.size and (ids_BL.min() < 0 or ids_BL.max() >= vocab_size):
      raise ValueError(f'encode_fn returned ids in [{ids_BL.min()}, {ids_BL.max()}], outside '
                       f'[0, vocab_size={vocab_size})')
    return ids_BL.astype(dtype)

  def flush():
    nonlocal buffered
    if not buffered:
      return
    arrays = {k: np.concatenate(v) for k, v in buf.items()}
    name = _SHARD.format(process_index, len(shards))
    atomic_file.write_atomically(os.path.join(path, name), lambda f: np.savez(f, **arrays))
    shards.append(name)
    shard_bytes.append(os.path.getsize(os.path.join(path, name)))
    for v in buf.values():
      v.clear()
    buffered = 0

  for batch in batches_iter:
    images_BHWC = np.asarray(batch['image'], np.float32)
    labels_B = np.asarray(batch['label'], np.int32)
    buf['ids'].append(encode(images_BHWC))
    buf['labels'].append(labels_B)
    if flip:
      buf['ids_flip'].append(encode(np.ascontiguousarray(images_BHWC[:, :, ::-1])))
    count += len(labels_B)
    buffered += len(labels_B)
    if buffered >= shard_size:
      flush()
      logging.info('token cache %s: %d examples encoded (%.1f/s)', path, count,
                   count / max(time.time() - t0, 1e-9))
  flush()

  meta = {
      'format_version': FORMAT_VERSION, 'L': int(num_scales_len), 'vocab_size': int(vocab_size),
      'patch_nums': None if patch_nums is None else [int(p) for p in patch_nums],
      'count': count, 'flip': bool(flip), 'image_size': image_size, 'dtype': dtype.name,
      'shards': shards, 'shard_bytes': shard_bytes, 'process_index': process_index,
      'process_count': process_count,
  }
  atomic_file.write_atomically(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
  atomic_file.fsync_dir(path)
  logging.info('token cache %s: wrote %d examples in %d shards (process %d of %d)', path, count,
               len(shards), process_index, process_count)
  return meta


def read_token_cache(path: str, *, expect: Mapping[str, Any] | None = None,
                     ) -> tuple[dict[str, np.ndarray], dict]:
  """All arrays of a cache in their stored dtypes: ({'ids', 'labels'[, 'ids_flip']}, meta).

  The merged meta has count summed over processes. `expect` is checked like load_token_cache.
  """
  parts = sorted(glob.glob(os.path.join(path, 'meta-*-of-*.json')))
  if not parts:
    raise FileNotFoundError(f'no token cache at {path} (no meta-*.json; build it with '
                            'build_token_cache, or it was interrupted before finishing)')
  metas = []
  for p in parts:
    problem = _part_problem(path, p)
    if problem is not None:
      raise ValueError(f'token cache {path}: {os.path.basename(p)}: {problem}; rerun '
                       'build_token_cache to rebuild the damaged part')
    with open(p) as f:
      metas.append(json.load(f))
  first = metas[0]
  for m, p in zip(metas, parts):
    for k in _SHARED_FIELDS:
      if m.get(k) != first.get(k):
        raise ValueError(f'token cache {path}: {os.path.basename(p)} has {k}={m.get(k)!r} but '
                         f'{os.path.basename(parts[0])} has {k}={first.get(k)!r}')
  have = sorted(m['process_index'] for m in metas)
  if have != list(range(first['process_count'])):
    raise ValueError(f'token cache {path}: parts from processes {have} but process_count='
                     f'{first["process_count"]}; some processes have not finished')
  meta = {k: first.get(k) for k in _SHARED_FIELDS + ('dtype',)}
  meta['count'] = sum(m['count'] for m in metas)
  meta['path'] = path
  _check_expected(meta, expect, path)

  keys = ('ids', 'labels') + (('ids_flip',) if meta['flip'] else ())
  chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  for m in sorted(metas, key=lambda m: m['process_index']):
    for name in m['shards']:
      with np.load(os.path.join(path, name)) as z:
        for k in keys:
          chunks[k].append(z[k])
  arrays = {k: (np.concatenate(v) if v else np.zeros((0, meta['L']) if k != 'labels' else (0,),
                                                       np.int32))
            for k, v in chunks.items()}
  if len(arrays['labels']) != meta['count']:
    raise ValueError(f'token cache {path}: metadata says count={meta["count"]} but the shards '
                     f'hold {len(arrays["labels"])} examples')
  return arrays, meta


def load_token_cache(path: str, *, expect: Mapping[str, Any] | None = None,
                     flipped: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
  """(ids int32 (N, L), labels int32 (N,), meta) of the cache at `path`.

  expect: values the caller relies on, e.g. {'L': 680, 'vocab_size': 4096, 'patch_nums': (...)};
    a mismatch raises ValueError naming both values. flipped: the ids of the mirrored images.
  """
  arrays, meta = read_token_cache(path, expect=expect)
  if flipped and 'ids_flip' not in arrays:
    raise ValueError(f'token cache {path} was built with flip=False; it has no flipped ids')
  ids = arrays['ids_flip' if flipped else 'ids']
  return ids.astype(np.int32), arrays['labels'].astype(np.int32), meta


def _check_expected(meta: dict, expect: Mapping[str, Any] | None, path: str):
  for key, want in (expect or {}).items():
    key = 'L' if key == 'num_scales_len' else key
    if key not in meta:
      raise KeyError(f'cannot check {key!r}: token cache metadata has {sorted(meta)}')
    have = meta[key]
    if key == 'patch_nums':
      have = None if have is None else tuple(have)
      want = None if want is None else tuple(int(p) for p in want)
    if have is None and key in ('patch_nums', 'image_size'):
      continue  # not recorded when the cache was built: nothing to contradict
    if have != want:
      raise ValueError(f'token cache {path} has {key}={have!r} but the caller expects '
                       f'{key}={want!r}; rebuild the cache or fix the config')
