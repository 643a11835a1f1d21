"""Inception features of many images, jitted and sharded over every device of every process.

    extractor = FeatureExtractor(params, InceptionConfig(), per_device_batch=64)
    feats = extractor.of_array(images_NHW3)         # {'pool', 'spatial', 'logits'}: numpy (N, .)
    feats = extractor.of_batches(local_batches)     # each process its own stream of images

The mesh has one axis, 'data', over all devices (`jax.devices()`, every process); the
Inception parameters are replicated and each global batch is split along it. Images travel
as uint8 (4x less host-to-device traffic than float) and are resized on the device. Every
process gets every feature back (gathered), in order: batch by batch, process by process.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mvar_jax import xla_cpu
from mvar_jax.evaluation import inception

OUTPUTS = ('pool', 'spatial', 'logits')


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh ('data',) over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ('data',))


class FeatureExtractor:
  """Inception features of uint8 / [0, 255] float images of any (fixed per call) size."""

  def __init__(self, params, config: inception.InceptionConfig = inception.InceptionConfig(), *,
               per_device_batch: int = 32, mesh: Mesh | None = None):
    if per_device_batch < 1:
      raise ValueError(f'per_device_batch must be >= 1, got {per_device_batch}')
    self.config = config.validate()
    self.mesh = data_mesh() if mesh is None else mesh
    self.batch_sharding = NamedSharding(self.mesh, P('data'))
    replicated = NamedSharding(self.mesh, P())
    self.global_batch = per_device_batch * self.mesh.size
    if self.global_batch % jax.process_count():
      raise ValueError(f'global batch {self.global_batch} must divide by the process count '
                       f'{jax.process_count()}')
    self.local_batch = self.global_batch // jax.process_count()
    self.params = jax.device_put(params, replicated)
    net = inception.FIDInception(self.config)
    self._fn = jax.jit(lambda p, x: net.apply({'params': p}, x),
                       in_shardings=(replicated, self.batch_sharding),
                       out_shardings=self.batch_sharding,
                       compiler_options=xla_cpu.conv_net_options())

  def _local_batch_for(self, total: int | None) -> int:
    """Rows per process and step for a set of `total` images (None: unknown).

    A set smaller than one global batch runs as one batch of the fewest rows per device that
    hold it, not padded to the full batch: 16 held-out images on 8 devices with 32 per
    device would otherwise cost 256 images' compute. (A new size compiles once more.)
    """
    if total is None or total >= self.global_batch:
      return self.local_batch
    per_device = -(-total // self.mesh.size)
    return per_device * self.mesh.size // jax.process_count()

  def _step(self, local_images: np.ndarray, local_valid: int) -> dict[str, np.ndarray]:
    """Features of one global batch; local_images holds this process's rows (padded)."""
    x = jax.make_array_from_process_local_data(self.batch_sharding, local_images)
    valid = jax.make_array_from_process_local_data(
        self.batch_sharding, (np.arange(len(local_images)) < local_valid))
    out = self._fn(self.params, x)
    gathered = multihost_utils.process_allgather({**out, 'valid': valid}, tiled=True)
    keep = np.asarray(gathered.pop('valid'))
    return {k: np.asarray(v)[keep] for k, v in gathered.items()}

  def of_batches(self, local_batches: Iterable[np.ndarray], *, total: int | None = None,
                 progress: bool = True) -> dict[str, np.ndarray]:
    """Features of every process's stream of (b, H, W, 3) batches (b <= local batch).

    Streams may hold different numbers of images: a process that ran out contributes
    padding until every process has (one small all-gather per batch decides). With one
    process, a `total` below one global batch runs as a smaller batch (`_local_batch_for`);
    with several, the batch stays whole, so that each step still takes one batch of every
    stream and the rows keep their order.
    """
    one_process = jax.process_count() == 1
    local_batch = self._local_batch_for(total) if one_process else self.local_batch
    return self._features(local_batches, local_batch, total=total, progress=progress)

  def _features(self, local_batches: Iterable[np.ndarray], local_batch: int, *,
                total: int | None, progress: bool) -> dict[str, np.ndarray]:
    """of_batches with `local_batch` rows per process and step."""
    it: Iterator[np.ndarray] = iter(local_batches)
    chunks = {k: [] for k in OUTPUTS}
    bar = _progress(total, progress)
    pending: np.ndarray | None = None
    shape, dtype = None, None
    while True:
      if pending is None:
        pending = next(it, None)
        if pending is not None:
          pending = np.asarray(pending)
          if pending.ndim != 4 or pending.shape[-1] != 3:
            raise ValueError(f'images must be (B, H, W, 3), got {pending.shape}')
          shape, dtype = shape or pending.shape[1:], dtype or pending.dtype
          if pending.shape[1:] != shape:
            raise ValueError(f'all images must share one size: {pending.shape[1:]} vs {shape}')
      take = pending[:local_batch] if pending is not None else None
      n_local = 0 if take is None else len(take)
      counts = multihost_utils.process_allgather(np.int32(n_local)) if jax.process_count() > 1 \
          else np.asarray([n_local])
      if not np.any(counts):
        break
      if shape is None:  # this process never had data: pad in the others' image size
        raise ValueError('a process has no images at all; give every process at least one batch')
      local = np.zeros((local_batch,) + tuple(shape), dtype)
      if n_local:
        local[:n_local] = take
      for k, v in self._step(local, n_local).items():
        chunks[k].append(v)
      bar.update(int(np.sum(counts)))
      pending = None if pending is None or len(pending) <= local_batch \
          else pending[local_batch:]
    bar.close()
    if not chunks['pool']:
      raise ValueError('no images to extract features from')
    return {k: np.concatenate(v) for k, v in chunks.items()}

  def of_array(self, images_NHW3, *, progress: bool = True) -> dict[str, np.ndarray]:
    """Features of an array every process can index (e.g. an npz's arr_0), in its order."""
    n = len(images_NHW3)
    if n == 0:
      raise ValueError('no images to extract features from')
    p, b = jax.process_index(), self._local_batch_for(n)

    def mine():
      for lo in range(0, n, b * jax.process_count()):
        yield np.asarray(images_NHW3[lo + p * b:min(lo + (p + 1) * b, n)])

    return self._features(_skip_empty_tail(mine()), b, total=n, progress=progress)


class NpzImages:
  """Rows of an array inside an .npz (e.g. arr_0 of a samples file), read on demand.

  50k 256 px images are 9.8 GB: slicing reads only the rows asked for, so feature extraction
  streams the file instead of loading it (np.savez stores members uncompressed).
  """

  def __init__(self, path: str, key: str = 'arr_0'):
    import zipfile
    self.path, self.key = path, key
    self._zip = zipfile.ZipFile(path)
    if f'{key}.npy' not in self._zip.namelist():
      names = [n[:-4] for n in self._zip.namelist()]
      raise ValueError(f'{path} has no array {key!r} (it has {names})')
    self._f = self._zip.open(f'{key}.npy')
    version = np.lib.format.read_magic(self._f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    self.shape, fortran, self.dtype = read_header(self._f)
    if fortran or self.dtype.hasobject:
      raise ValueError(f'{path}:{key} must be a C-ordered numeric array')
    self._offset = self._f.tell()
    self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

  def __len__(self) -> int:
    return int(self.shape[0])

  def __getitem__(self, rows: slice) -> np.ndarray:
    lo, hi, step = rows.indices(len(self))
    if step != 1:
      raise ValueError('NpzImages reads contiguous slices only')
    n = max(hi - lo, 0)
    self._f.seek(self._offset + lo * self._row_bytes)
    data = self._f.read(n * self._row_bytes)
    return np.frombuffer(data, self.dtype).reshape((n,) + tuple(self.shape[1:]))

  def close(self):
    self._f.close()
    self._zip.close()


def _skip_empty_tail(batches):
  """Drops empty slices (a process whose share of the last global batch is nothing)."""
  for x in batches:
    if len(x):
      yield x


def _progress(total, enabled):
  import tqdm
  return tqdm.tqdm(total=total, desc='inception features', unit='img',
                   disable=not enabled or jax.process_index() != 0)
