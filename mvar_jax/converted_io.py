"""Converted-weight directories: streamed msgpack files with a manifest of hashes.

    write_converted(out_dir, 'transformer', config_dict, tree)  # leaves: arrays or callables
    config_dict, params = read_converted(out_dir, 'transformer')

A model `name` is three files: `name.msgpack` (the parameter tree), `name.json` (its config) and
`name.manifest.json` (size and SHA-256 of the other two, written last).

Why msgpack, written by hand one tensor at a time: it is the format of every directory converted
so far, and flax's `msgpack_restore` reads what we write byte for byte (an ndarray leaf is the ext
record flax uses). msgpack is a streaming format: a map header carries its entry count, so a
tree whose structure is known up front can be written leaf by leaf, each tensor fetched (e.g. from
a memory-mapped .pth), converted, written and dropped; and `msgpack.Unpacker` reads it back from
the file one record at a time. Peak memory is therefore the tree being built plus one tensor,
not the tree plus a blob of the whole file (what `msgpack_serialize`/`msgpack_restore` need).
Orbax/TensorStore would also stream, but saves a whole in-memory pytree and changes the layout
that our readers (and users' scripts) expect; safetensors would add a dependency for no gain.

Integrity: the hashes are computed while writing (no second pass) and checked while reading
(the reader hashes the bytes it parses). A file that is missing, shorter or longer than the
manifest says, or whose bytes changed, raises `CorruptWeightsError` naming the file and the
fault. A directory without a manifest (converted before manifests existed) still loads, with a
warning; reconverting adds one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Any, Callable, Mapping

import msgpack
import numpy as np

from mvar_jax import atomic_file

MANIFEST_VERSION = 1
_NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray
_CHUNK = 1 << 20  # bytes per read while hashing/parsing


class CorruptWeightsError(ValueError):
  """A converted-weight file that is missing, truncated or altered since it was written."""


def file_names(name: str) -> tuple[str, str, str]:
  """(params, config, manifest) file names of model `name`."""
  return f'{name}.msgpack', f'{name}.json', f'{name}.manifest.json'


# ----------------------------------------------------------------------------- writing

class _HashingWriter:
  """A binary file that also hashes and counts what goes through it."""

  def __init__(self, f):
    self._f, self.sha256, self.size = f, hashlib.sha256(), 0

  def write(self, data) -> None:
    self._f.write(data)
    self.sha256.update(data)
    self.size += len(data)


def _bin_header(n: int) -> bytes:
  if n < 1 << 8:
    return b'\xc4' + n.to_bytes(1, 'big')
  if n < 1 << 16:
    return b'\xc5' + n.to_bytes(2, 'big')
  return b'\xc6' + n.to_bytes(4, 'big')


_FIXEXT = {1: b'\xd4', 2: b'\xd5', 4: b'\xd6', 8: b'\xd7', 16: b'\xd8'}


def _ext_header(n: int, code: int) -> bytes:
  """The shortest msgpack ext header, as msgpack's own packer picks it."""
  t = code.to_bytes(1, 'big', signed=True)
  if n in _FIXEXT:
    return _FIXEXT[n] + t
  if n < 1 << 8:
    return b'\xc7' + n.to_bytes(1, 'big') + t
  if n < 1 << 16:
    return b'\xc8' + n.to_bytes(2, 'big') + t
  if n < 1 << 32:
    return b'\xc9' + n.to_bytes(4, 'big') + t
  raise ValueError(f'a tensor of {n} bytes does not fit one msgpack record (limit 4 GiB)')


def _write_ndarray(out: _HashingWriter, arr: np.ndarray) -> None:
  """The ext record flax writes for an ndarray: (shape, dtype name, C-order bytes)."""
  if not arr.flags.c_contiguous:  # transposed views: one tensor's copy at a time
    arr = arr.copy(order='C')
  if arr.dtype.hasobject or arr.dtype.isalignedstruct:
    raise ValueError(f'cannot store dtype {arr.dtype}')
  inner = (b'\x93' + msgpack.packb(list(arr.shape)) +
           msgpack.packb(arr.dtype.name, use_bin_type=True) + _bin_header(arr.nbytes))
  out.write(_ext_header(len(inner) + arr.nbytes, _NDARRAY_EXT) + inner)
  out.write(memoryview(arr.reshape(-1).view(np.uint8)))


def _write_tree(out: _HashingWriter, node: Mapping[str, Any], packer: msgpack.Packer) -> None:
  out.write(packer.pack_map_header(len(node)))
  for key in sorted(node):  # the order of flax's msgpack_serialize (jax sorts dict keys)
    value = node[key]
    out.write(packer.pack(str(key)))
    if isinstance(value, Mapping):
      _write_tree(out, value, packer)
      continue
    leaf = value() if callable(value) else value
    _write_ndarray(out, np.asarray(leaf))
    del leaf  # let the tensor go before the next one is fetched


def _write_atomically(path: str, write: Callable[[_HashingWriter], None]) -> dict:
  """Writes through `write` into a temporary file, fsyncs, renames; returns size and hash."""
  writers = []

  def hashing_write(f):
    writers.append(_HashingWriter(f))
    write(writers[0])

  atomic_file.write_atomically(path, hashing_write)
  out = writers[0]
  return {'bytes': out.size, 'sha256': out.sha256.hexdigest()}


def write_converted(out_dir: str, name: str, config: Mapping[str, Any],
                    tree: Mapping[str, Any]) -> dict:
  """Writes model `name` (params tree, config dict, manifest) into `out_dir`; returns the manifest.

  tree: nested mappings whose leaves are arrays or zero-argument callables returning one;
    callables are called one at a time while writing, so a caller can stream tensors.
  """
  params_file, config_file, manifest_file = file_names(name)
  os.makedirs(out_dir, exist_ok=True)
  # The manifest goes first and comes back last: until it is back, the directory is a
  # conversion in progress (loads with a warning at worst, never against stale hashes).
  if os.path.exists(os.path.join(out_dir, manifest_file)):
    os.remove(os.path.join(out_dir, manifest_file))
  packer = msgpack.Packer(use_bin_type=True)
  files = {
      params_file: _write_atomically(os.path.join(out_dir, params_file),
                                     lambda out: _write_tree(out, tree, packer)),
      config_file: _write_atomically(os.path.join(out_dir, config_file),
                                     lambda out: out.write(json.dumps(config, indent=2).encode())),
  }
  manifest = {'version': MANIFEST_VERSION, 'hash': 'sha256', 'files': files}
  _write_atomically(os.path.join(out_dir, manifest_file),
                    lambda out: out.write(json.dumps(manifest, indent=2).encode()))
  atomic_file.fsync_dir(out_dir)
  return manifest


# ----------------------------------------------------------------------------- reading

class _HashingReader:
  """A binary file that also hashes and counts what is read from it."""

  def __init__(self, f):
    self._f, self.sha256, self.size = f, hashlib.sha256(), 0

  def read(self, n: int = -1) -> bytes:
    data = self._f.read(n)
    self.sha256.update(data)
    self.size += len(data)
    return data

  def drain(self) -> None:
    while self.read(_CHUNK):
      pass


def _dtype_from_name(name: bytes):
  if name == b'bfloat16':
    import ml_dtypes  # a jax dependency
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name.decode())


def _ext_hook(code: int, data: bytes, leaf_fn=None):
  if leaf_fn is not None:
    return leaf_fn(_ext_hook(code, data))
  if code != _NDARRAY_EXT:
    from flax import serialization  # complex numbers and numpy scalars, as flax wrote them
    return serialization._msgpack_ext_unpack(code, data)  # pylint: disable=protected-access
  # (shape, dtype name, bin): parse the small head, then view the bytes in place (no copy).
  head = msgpack.Unpacker(raw=True)
  head.feed(data[:1024])
  if head.read_array_header() != 3:
    raise ValueError('malformed ndarray record')
  shape, dtype = tuple(head.unpack()), _dtype_from_name(head.unpack())
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  return np.frombuffer(data, dtype, offset=len(data) - nbytes).reshape(shape)


def _unchunk(node):
  """Arrays that flax split into chunks (leaves above 1 GiB) become whole again."""
  if not isinstance(node, dict):
    return node
  if '__msgpack_chunked_array__' in node:
    shape = tuple(node['shape'][str(i)] for i in range(len(node['shape'])))
    chunks = [node['chunks'][str(i)] for i in range(len(node['chunks']))]
    return np.concatenate(chunks).reshape(shape)
  return {k: _unchunk(v) for k, v in node.items()}


def _read_manifest(directory: str, name: str) -> dict | None:
  path = os.path.join(directory, file_names(name)[2])
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest['files']
    for entry in files.values():
      int(entry['bytes']), str(entry['sha256'])
  except (ValueError, KeyError, TypeError) as e:
    raise CorruptWeightsError(f'{path}: unreadable manifest ({e}); reconvert the weights '
                              '(python -m mvar_jax.convert ...)') from e
  return manifest


def _check_present_and_sized(directory: str, manifest: dict) -> None:
  for fname, entry in manifest['files'].items():
    path = os.path.join(directory, fname)
    if not os.path.exists(path):
      raise CorruptWeightsError(f'{path}: missing (listed in the manifest); reconvert the weights')
    size, want = os.path.getsize(path), int(entry['bytes'])
    if size < want:
      raise CorruptWeightsError(f'{path}: truncated: {size} bytes, the manifest says {want}; '
                                'reconvert the weights')
    if size > want:
      raise CorruptWeightsError(f'{path}: {size} bytes, the manifest says {want} (bytes were '
                                'appended or the file was replaced); reconvert the weights')


def _mismatch(path: str, got: str, want: str) -> CorruptWeightsError:
  return CorruptWeightsError(f'{path}: hash mismatch: the bytes changed since conversion '
                             f'(sha256 {got[:16]}..., manifest {want[:16]}...); reconvert the '
                             'weights')


def read_converted(directory: str, name: str, *, leaf_fn: Callable | None = None
                   ) -> tuple[dict, dict]:
  """(config dict, params tree of numpy arrays) of model `name` in `directory`, verified.

  leaf_fn: applied to each array as soon as it is read (e.g. `jnp.asarray` to move it to the
    device), so that only one host copy of a tensor exists at a time.

  Raises FileNotFoundError when the directory holds no such model, CorruptWeightsError when a
  file is missing, truncated or altered (with a manifest), or cannot be parsed (without one).
  """
  params_file, config_file, _ = file_names(name)
  params_path, config_path = (os.path.join(directory, f) for f in (params_file, config_file))
  for path in (params_path, config_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: expected a converted checkpoint directory '
                              f'(python -m mvar_jax.convert ... --out {directory})')
  manifest = _read_manifest(directory, name)
  if manifest is None:
    logging.warning('%s has no %s: integrity not checked (converted by an older version; '
                    'reconvert to add the manifest)', directory, file_names(name)[2])
  else:
    _check_present_and_sized(directory, manifest)
  want = {} if manifest is None else {f: e['sha256'] for f, e in manifest['files'].items()}

  with open(config_path, 'rb') as f:
    raw = f.read()
  if config_file in want and hashlib.sha256(raw).hexdigest() != want[config_file]:
    raise _mismatch(config_path, hashlib.sha256(raw).hexdigest(), want[config_file])
  try:
    config = json.loads(raw)
  except ValueError as e:
    raise CorruptWeightsError(f'{config_path}: not valid JSON ({e}); reconvert the weights') from e

  with open(params_path, 'rb') as f:
    reader = _HashingReader(f)
    hook = _ext_hook if leaf_fn is None else functools.partial(_ext_hook, leaf_fn=leaf_fn)
    unpacker = msgpack.Unpacker(reader, read_size=_CHUNK, ext_hook=hook, raw=False,
                                strict_map_key=False, max_buffer_size=2**32 - 1)
    try:
      params = unpacker.unpack()
      reader.drain()
      trailing = reader.size - unpacker.tell()
      error = None
    except Exception as e:  # pylint: disable=broad-except
      reader.drain()
      error, trailing = e, 0
  got = reader.sha256.hexdigest()
  if params_file in want and got != want[params_file]:
    raise _mismatch(params_path, got, want[params_file])
  if error is not None:
    raise CorruptWeightsError(f'{params_path}: unreadable ({type(error).__name__}: {error}); the '
                              'file is truncated or corrupt: reconvert the weights') from error
  if trailing:
    raise CorruptWeightsError(f'{params_path}: {trailing} bytes after the parameter tree; '
                              'reconvert the weights')
  if not isinstance(params, dict):
    raise CorruptWeightsError(f'{params_path}: holds a {type(params).__name__}, not a parameter '
                              'tree; reconvert the weights')
  return config, _unchunk(params)
