"""JAX's persistent compilation cache, on by default for the CLI and the API.

    from mvar_jax import compilation_cache
    compilation_cache.enable()            # $MVAR_COMPILATION_CACHE_DIR or ~/.cache/mvar_jax/xla
    compilation_cache.enable('/scratch/xla')   # an explicit directory
    compilation_cache.enable('none')           # off

The sampler compiles one large program per batch size (every scale unrolled: ~20 s on a
2-core CPU at d16); with the cache a second process loads the executable from disk instead.
JAX's cache alone still traces and lowers the program in every process to find its key
(~5.5 s of CPU at d16), so `load_or_compile` also keeps the whole compiled executable, under a
key of our own, in EXECUTABLES_SUBDIR of the same directory.
Precedence: the `directory` argument, then $MVAR_COMPILATION_CACHE_DIR, then a directory the
user already gave JAX (`jax_compilation_cache_dir` / $JAX_COMPILATION_CACHE_DIR), then the
default. 'none' (or '') in the argument or the variable turns the cache off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
from typing import Callable

import jax

from mvar_jax import atomic_file

ENV_VAR = 'MVAR_COMPILATION_CACHE_DIR'
DEFAULT_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'mvar_jax', 'xla')
_OFF = ('', 'none', 'off')


def resolve_directory(directory: str | None = None) -> str | None:
  """The cache directory that `enable` would use, or None when the cache is off."""
  if directory is None:
    directory = os.environ.get(ENV_VAR)
  if directory is None:
    directory = jax.config.jax_compilation_cache_dir or DEFAULT_DIR
  if directory.strip().lower() in _OFF:
    return None
  return os.path.abspath(os.path.expanduser(directory))


def enable(directory: str | None = None) -> str | None:
  """Points JAX's persistent cache at the resolved directory; returns it (None: off, and
  JAX's own cache off too, wherever it pointed).

  Idempotent. Programs that compile in under JAX's threshold
  (`jax_persistent_cache_min_compile_time_secs`, 1 s unless the user set it) are not
  written, so small helpers do not fill the disk.
  """
  path = resolve_directory(directory)
  if jax.config.jax_compilation_cache_dir != path:
    if path is not None:
      os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir:
      # JAX opens its cache once, at the first compile: re-point an open one explicitly.
      # Off means off: a directory JAX had from $JAX_COMPILATION_CACHE_DIR is dropped too.
      from jax.experimental.compilation_cache import compilation_cache
      compilation_cache.reset_cache()
    jax.config.update('jax_compilation_cache_dir', path)
  return path


# ----------------------------------------------------------------------- whole executables

EXECUTABLES_SUBDIR = 'mvar_executables'


def _source_fingerprint() -> str:
  """Hash of this package's Python sources: an edited model never loads a stale program."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        h.update(os.path.relpath(path, root).encode())
        with open(path, 'rb') as f:
          h.update(f.read())
  return h.hexdigest()


_SOURCE_FINGERPRINT = None


def executable_key(*parts) -> str:
  """A file name for a program described by `parts` (reprs) on this machine's JAX and device."""
  global _SOURCE_FINGERPRINT
  if _SOURCE_FINGERPRINT is None:
    _SOURCE_FINGERPRINT = _source_fingerprint()
  import flax
  import jaxlib
  device = jax.devices()[0]
  # XLA_FLAGS and these JAX options change what compiles without changing our arguments.
  described = repr((parts, jax.__version__, jaxlib.__version__, flax.__version__,
                    device.platform, device.device_kind, jax.device_count(),
                    jax.process_count(), jax.process_index(), os.environ.get('XLA_FLAGS', ''),
                    jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                    _SOURCE_FINGERPRINT))
  return hashlib.sha256(described.encode()).hexdigest()


_JAX_CACHE_HITS = threading.local()  # .count: JAX persistent-cache hits on this thread


def _count_jax_cache_hits(event: str, **kwargs) -> None:
  del kwargs
  if event == '/jax/compilation_cache/cache_hits':
    _JAX_CACHE_HITS.count = getattr(_JAX_CACHE_HITS, 'count', 0) + 1


_LISTENING = False


def _jax_cache_hits() -> int:
  """JAX persistent-cache hits on this thread so far (a jax.monitoring listener counts them)."""
  global _LISTENING
  if not _LISTENING:
    jax.monitoring.register_event_listener(_count_jax_cache_hits)
    _LISTENING = True
  return getattr(_JAX_CACHE_HITS, 'count', 0)


def load_or_compile(key: str, lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
  """The executable stored under `key` in the cache directory, else lower().compile() (stored).

  JAX's own cache saves the backend compile but not the tracing and lowering that come before
  its lookup: for the d16 sampler those are ~5.5 s of CPU in every new process. Stored here
  is the whole `jax.stages.Compiled` (jax.experimental.serialize_executable), so a later
  process runs without tracing. Off when the persistent cache is off; a file that does not
  load (truncated, another jaxlib) is replaced by a fresh compile. Only a real compile is
  stored, not an executable JAX's own cache returned (see the comment below).
  """
  from jax.experimental import serialize_executable
  directory = jax.config.jax_compilation_cache_dir
  path = os.path.join(directory, EXECUTABLES_SUBDIR, f'{key}.pkl') if directory else None
  if path and os.path.exists(path):
    try:
      with open(path, 'rb') as f:
        payload, in_tree, out_tree, device_ids = pickle.load(f)
      by_id = {d.id: d for d in jax.devices()}
      # The devices it was compiled for: by default it would be loaded onto all of them.
      compiled = serialize_executable.deserialize_and_load(
          payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
      logging.info('compilation_cache: loaded %s', path)
      return compiled
    except Exception as e:  # noqa: BLE001  any unreadable file means: compile again
      logging.warning('compilation_cache: ignoring unreadable %s (%s: %s)', path,
                      type(e).__name__, e)
  hits = _jax_cache_hits()
  compiled = lower().compile()
  if path and _jax_cache_hits() != hits:
    # JAX loaded this program from its own cache. On XLA:CPU (jaxlib 0.10) such an executable
    # re-serialises without its kernels (30 kB compiled, 10 kB loaded and serialised again):
    # stored, it fails in any later process with "Function ... not found". JAX's entry
    # serves the next process instead (it traces and lowers again, as without this cache).
    # This happened whenever our key changed and the program did not (an edited source, two
    # configs differing in a field the program does not read).
    logging.info('compilation_cache: %s came from JAX\'s cache; not stored again', key)
    if os.path.exists(path):  # an unreadable file (loaded ones return above): drop it
      try:
        os.remove(path)
      except OSError:
        pass
    return compiled
  if path:
    try:
      device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
      blob = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      atomic_file.write_atomically(path, lambda f: f.write(blob))
    except Exception as e:  # noqa: BLE001  a full disk or a backend that cannot serialise
      logging.warning('compilation_cache: not storing %s (%s: %s)', path, type(e).__name__, e)
  return compiled
