"""Sample mode: sharded, resumable sampling of an evaluation set into ADM's samples.npz.

    python main.py --mode=sample --config=configs/mvar_d16.py --workdir=workdirs/d16 \
        --config.tokenizer.checkpoint=weights/mvar_d16 --config.sample.checkpoint=weights/mvar_d16
    path = sample_mode.run(config, workdir)   # <output_dir>/samples.npz

Which image is which. Image i (0 <= i < N = sample.num_images) has label
i % num_classes (50 per class for N = 50,000 and 1000 classes). The images are
cut into chunks of b = sample.batch_size (images per device per call); chunk
c = i // b is sampled on one device, in one call, with the key fold_in(key(seed), c),
and image i is row i % b of it. So image i is a function of
(seed, b, i) and the weights alone: the number of processes and devices, which
device drew the chunk, and any restart change nothing. (Each device runs the one-chunk
sampler on its chunk. Tested on CPU: the bytes are identical for any number of processes
and devices used, and across kill -9 and resume, given the same number of CPU devices per
process. XLA:CPU sizes its thread pool by that number and splits loops by the pool, so a
process with 4 CPU devices and one with 8 can differ in a float's last bit: one uint8 value
in ~25,000 came out one level apart.)

Work. Process p of P samples the chunks c with c % P == p, D at a time on its D local
devices: one SPMD program (`sampling.compile_chunk_sampler`; compiled once per host, not
once per device), chunk d of a call on device d. A call's images are written while the
next call runs.

On disk, in sample.output_dir (default <workdir>/samples; shared by all processes):
  shards/chunk_0000123.npz   images uint8 (b, H, W, 3), labels int64 (b,), fingerprint
                             (written to a temporary name, then renamed: never half there)
  samples.npz                arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,) -- ADM's format,
                             streamed from the shards by process 0 (never all in memory)
  samples.png                a grid of the first 64 images
A restart skips the chunks whose shard is there; a shard of another run (other seed,
weights or settings: its fingerprint differs) is an error, not silently mixed in.
The directory is checked writable before any weight is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import zipfile

from absl import logging
import flax.linen as nn
import jax
import numpy as np

from mvar_jax import atomic_file
from mvar_jax import checkpointing
from mvar_jax import config_utils
from mvar_jax import lifecycle
from mvar_jax import transformer as tfm

SHARD_DIR = 'shards'
NPZ_NAME = 'samples.npz'
GRID_NAME = 'samples.png'
GRID_IMAGES = 64


# ----------------------------------------------------------------------------- the plan

def labels_for(num_images: int, num_classes: int) -> np.ndarray:
  """(N,) int64: image i has label i % num_classes (balanced when N is a multiple)."""
  return np.arange(num_images, dtype=np.int64) % num_classes


def num_chunks(num_images: int, chunk: int) -> int:
  return math.ceil(num_images / chunk)


def chunks_of(process_index: int, process_count: int, total_chunks: int) -> list[int]:
  """The chunks process p samples: c % P == p (any P covers all chunks exactly once)."""
  return list(range(process_index, total_chunks, process_count))


def shard_path(out_dir: str, c: int) -> str:
  return os.path.join(out_dir, SHARD_DIR, f'chunk_{c:07d}.npz')


def chunk_key(seed: int, c: int) -> jax.Array:
  """The sampler key of chunk c: a function of (seed, c) only."""
  return jax.random.fold_in(jax.random.key(seed), c)


# ----------------------------------------------------------------------------- output dir

def check_writable(out_dir: str) -> None:
  """Creates out_dir/shards and writes a probe file there, or raises naming the directory."""
  try:
    os.makedirs(os.path.join(out_dir, SHARD_DIR), exist_ok=True)
    probe = os.path.join(out_dir, SHARD_DIR,
                         f'.probe.{os.getpid()}.{jax.process_index()}.{threading.get_ident()}')
    with open(probe, 'wb') as f:
      f.write(b'ok')
    os.remove(probe)
  except OSError as e:
    raise PermissionError(
        f'sample.output_dir={out_dir!r} is not writable ({e.strerror or e}); nothing was sampled. '
        'Choose a writable directory (--config.sample.output_dir=...)') from e


def read_shard(path: str, fingerprint: str) -> dict | None:
  """The shard's arrays, or None if it is absent or unreadable (then it is sampled again).

  Raises if it belongs to another run (its fingerprint differs).
  """
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as z:
      found = str(z['fingerprint'])
      if found != fingerprint:
        raise ValueError(
            f'{path} was written by another sampling run (fingerprint {found}, this run '
            f'{fingerprint}: seed, weights, sample.* settings or num_images differ). Use another '
            'sample.output_dir or delete its shards/ folder')
      return {'images': z['images'], 'labels': z['labels']}
  except (OSError, zipfile.BadZipFile, KeyError, EOFError) as e:
    logging.warning('shard %s is unreadable (%s); sampling it again', path, e)
    return None


def fingerprint_of(config, weights: str) -> str:
  """Hash of everything that decides the images: weights, seed and the sample.* settings."""
  s = config.sample
  keys = {'weights': weights, 'seed': int(config.seed), 'num_images': int(s.num_images),
          'batch_size': int(s.batch_size), 'cfg': float(s.cfg), 'top_k': int(s.top_k),
          'top_p': float(s.top_p), 'more_smooth': bool(s.more_smooth)}
  if s.get('param_dtype', ''):  # only when set: earlier runs' shards keep their fingerprint
    keys['param_dtype'] = str(s.param_dtype)
  return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- weights

def _abstract_params(model_cfg: tfm.TransformerConfig):
  return nn.unbox(jax.eval_shape(lambda: tfm.init_params(model_cfg, jax.random.key(0)))['params'])


def load_params(config, workdir: str):
  """(transformer module, params on this process's first device, weights description).

  config.sample.checkpoint (a converted directory) brings its own architecture; otherwise the
  newest checkpoint in <workdir>/checkpoints with config.model (its EMA params when it has them
  and sample.use_ema is set). The params are in sample.param_dtype when it is set.
  """
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # sample.param_dtype: each tensor is cast as it is read, so the device never holds the
  # stored params next to their cast copy (as api.load_pretrained(param_dtype=...)).
  dtype = config.sample.get('param_dtype', '') or None
  if config.sample.checkpoint:
    from mvar_jax import api
    cfg_dict, params = checkpointing.load_converted(
        config.sample.checkpoint, 'transformer', leaf_fn=api.host_cast(dtype) if dtype else None)
    model_cfg = config_utils.transformer_config_from_dict(cfg_dict)
    checkpointing.check_tree_matches(params, _abstract_params(model_cfg), config.sample.checkpoint)
    return (tfm.MVARTransformer(model_cfg), jax.device_put(params, local),
            os.path.abspath(config.sample.checkpoint))
  model_cfg = config_utils.transformer_config_from(config).validate()
  ckpt = checkpointing.Checkpointer(os.path.join(os.path.abspath(workdir), 'checkpoints'))
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt.directory} and sample.checkpoint is empty')
    key = ('ema_params' if config.sample.use_ema and 'ema_params' in ckpt.item_structure(step)
           else 'params')
    # Every process reads a whole copy onto its own first device.
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=local),
        _abstract_params(model_cfg))  # Orbax casts to the abstract dtype as it restores
    params = ckpt.restore_subtree(step, {key: abstract})[key]
  finally:
    ckpt.close()
  logging.info('sampling from %s of step %d in %s', key, step, ckpt.directory)
  return tfm.MVARTransformer(model_cfg), params, f'{ckpt.directory}@{step}:{key}'


# ----------------------------------------------------------------------------- sampling

def _groups(todo: list[int], d: int) -> list[list[int]]:
  """todo in groups of d, one per call; the last group padded with repeats of its last chunk
  (computed, never written)."""
  groups = [todo[i:i + d] for i in range(0, len(todo), d)]
  if groups:
    groups[-1] = groups[-1] + [groups[-1][-1]] * (d - len(groups[-1]))
  return groups


def _sample_groups(todo, devices, *, model, params, tokenizer, tok_params, labels_N, config,
                   out_dir, fp, progress):
  """Samples and writes the chunks in `todo`, len(devices) per call (chunk d on device d).

  One SPMD program for all the devices (compiled once, not once per device); the next
  call is dispatched before the previous one's images are fetched and written.
  """
  from mvar_jax import sampling  # the sampler's public entry point
  s = config.sample
  b, n = int(s.batch_size), int(s.num_images)
  sampler = sampling.compile_chunk_sampler(
      model, params, tokenizer, tok_params, devices=devices, chunk_size=b, cfg=s.cfg,
      top_k=s.top_k, more_smooth=s.more_smooth)
  params, tok_params = sampler.replicate({'params': params}), sampler.replicate(tok_params)

  def labels_of(c):
    lab = labels_N[c * b:min((c + 1) * b, n)]
    return np.concatenate([lab, np.repeat(lab[-1:], b - len(lab))])  # one compiled shape

  def write(group, images_DBHW3):
    imgs = np.asarray(jax.device_get(images_DBHW3))
    for c in dict.fromkeys(group):  # a padded group repeats its last chunk
      lo, hi = c * b, min((c + 1) * b, n)
      arrays = dict(images=np.clip(np.round(imgs[group.index(c)][:hi - lo] * 255), 0, 255)
                    .astype(np.uint8), labels=labels_N[lo:hi].astype(np.int64),
                    fingerprint=np.asarray(fp))
      atomic_file.write_atomically(shard_path(out_dir, c), lambda f: np.savez(f, **arrays))
      progress(hi - lo)

  pending = None
  for group in _groups(todo, len(devices)):
    keys = jax.numpy.stack([chunk_key(int(config.seed), c) for c in group])
    _, images = sampler(params, tok_params, keys=keys,
                        labels=np.stack([labels_of(c) for c in group]), cfg=s.cfg,
                        top_p=s.top_p)
    if pending is not None:
      write(*pending)
    pending = (group, images)
  if pending is not None:
    write(*pending)


def _write_npz_streaming(out_dir: str, total_chunks: int, fp: str, num_images: int) -> str:
  """Streams the shards, in order, into samples.npz (arr_0 written piece by piece); atomic."""

  def shard(c):
    found = read_shard(shard_path(out_dir, c), fp)
    if found is None:
      raise FileNotFoundError(f'{shard_path(out_dir, c)} is missing or unreadable (is '
                              'sample.output_dir shared by all processes?); rerun sample mode')
    return found

  first = shard(0)
  h, w, ch = first['images'].shape[1:]
  path = os.path.join(out_dir, NPZ_NAME)
  tmp = f'{path}.tmp.{os.getpid()}'
  labels = []
  with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    with zf.open('arr_0.npy', 'w', force_zip64=True) as f:
      np.lib.format.write_array_header_1_0(f, {'descr': np.lib.format.dtype_to_descr(
          np.dtype(np.uint8)), 'fortran_order': False, 'shape': (num_images, h, w, ch)})
      for c in range(total_chunks):
        arrays = first if c == 0 else shard(c)
        f.write(np.ascontiguousarray(arrays['images'], np.uint8).tobytes())
        labels.append(arrays['labels'])
    with zf.open('arr_1.npy', 'w') as f:
      np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))
  with open(tmp, 'rb+') as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def _write_grid(out_dir: str, fp: str) -> None:
  from PIL import Image
  imgs = []
  c = 0
  while sum(len(x) for x in imgs) < GRID_IMAGES:
    shard = read_shard(shard_path(out_dir, c), fp)
    if shard is None:
      break
    imgs.append(shard['images'])
    c += 1
  arr = np.concatenate(imgs)[:GRID_IMAGES].astype(np.float32) / 255
  Image.fromarray(image_grid(arr)).save(os.path.join(out_dir, GRID_NAME))


def image_grid(images_NHW3: np.ndarray, cols: int | None = None) -> np.ndarray:
  """(N, H, W, 3) floats in [0, 1] -> one (rows*H, cols*W, 3) uint8 grid."""
  n, h, w, c = images_NHW3.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  imgs = np.clip(np.round(images_NHW3 * 255), 0, 255).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = imgs[i]
  return grid


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def run(config, workdir: str, *, devices=None) -> str:
  """Samples config.sample.num_images images into <output_dir>/samples.npz; returns its path.

  Uses every local device of every process (or `devices`, this process's devices to use); safe
  to kill at any moment and rerun.
  """
  config_utils.validate_config(config, check_mesh=False, mode='sample')
  s = config.sample
  out_dir = os.path.abspath(s.output_dir or os.path.join(workdir, 'samples'))
  check_writable(out_dir)  # before the first weight is read, let alone the first batch
  # Two sample runs into one directory would interleave shards of different settings.
  out_lock = lifecycle.WorkdirLock(out_dir).acquire() if jax.process_index() == 0 else None
  try:
    return _run_locked(config, workdir, out_dir, devices)
  finally:
    if out_lock is not None:
      out_lock.release()


def _run_locked(config, workdir: str, out_dir: str, devices) -> str:
  import tqdm
  from mvar_jax import train  # load_tokenizer_for
  s = config.sample

  model, params, weights = load_params(config, workdir)
  tokenizer, tok_host = train.load_tokenizer_for(model.config, config.tokenizer.checkpoint,
                                                 decoder_dtype=train.decoder_dtype(config))
  # The decode's convs in its dtype once, here, rather than in every call of the program
  # (which casts them the same way: the same images; a no-op for fp32 decodes).
  tok_host = tokenizer.cast_for_decode(tok_host)
  n, b = int(s.num_images), int(s.batch_size)
  total = num_chunks(n, b)
  labels_N = labels_for(n, model.config.num_classes)
  fp = fingerprint_of(config, weights)
  mine = chunks_of(jax.process_index(), jax.process_count(), total)
  todo = [c for c in mine if read_shard(shard_path(out_dir, c), fp) is None]
  # No more devices than this process has chunks: the program's width is fixed by the run's
  # settings, not by how many chunks a restart finds left (its executable is reused).
  devices = list(devices or jax.local_devices())[:max(1, len(mine))]
  logging.info('sample mode: %d images in %d chunks of %d; process %d of %d samples %d chunks '
               '(%d already written) on %d devices into %s', n, total, b, jax.process_index(),
               jax.process_count(), len(todo), len(mine) - len(todo), len(devices), out_dir)

  bar = tqdm.tqdm(total=sum(min(b, n - c * b) for c in todo), desc='sampling', unit='img',
                  disable=jax.process_index() > 0)
  start = time.time()
  if todo:
    _sample_groups(todo, devices, model=model, params=params, tokenizer=tokenizer,
                   tok_params=tok_host, labels_N=labels_N, config=config, out_dir=out_dir,
                   fp=fp, progress=bar.update)
  bar.close()
  if todo:
    dt = time.time() - start
    logging.info('sampled %d images in %.1f s (%.2f images/s per device, compilation included)',
                 bar.n, dt, bar.n / dt / len(devices))

  _barrier('mvar_jax.sample_mode: all shards written')
  path = os.path.join(out_dir, NPZ_NAME)
  if jax.process_index() == 0:
    path = _write_npz_streaming(out_dir, total, fp, n)
    _write_grid(out_dir, fp)
    logging.info('wrote %d samples to %s', n, path)
  _barrier('mvar_jax.sample_mode: samples.npz written')
  return path
