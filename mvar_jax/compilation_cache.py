"""JAX's persistent compilation cache, on by default for the CLI and the API.

    from mvar_jax import compilation_cache
    compilation_cache.enable()            # $MVAR_COMPILATION_CACHE_DIR or ~/.cache/mvar_jax/xla
    compilation_cache.enable('/scratch/xla')   # an explicit directory
    compilation_cache.enable('none')           # off

The sampler compiles one large program per batch size (every scale unrolled: ~20 s on a
2-core CPU at d16); with the cache a second process loads the executable from disk instead.
Precedence: the `directory` argument, then $MVAR_COMPILATION_CACHE_DIR, then a directory the
user already gave JAX (`jax_compilation_cache_dir` / $JAX_COMPILATION_CACHE_DIR), then the
default. 'none' (or '') in the argument or the variable turns the cache off.
"""

from __future__ import annotations

import os

import jax

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
  """Points JAX's persistent cache at the resolved directory; returns it (None: off).

  Idempotent. Programs that compile in under JAX's threshold
  (`jax_persistent_cache_min_compile_time_secs`, 1 s unless the user set it) are not
  written, so small helpers do not fill the disk.
  """
  path = resolve_directory(directory)
  if path is None:
    return None
  if jax.config.jax_compilation_cache_dir != path:
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir:
      # JAX opens its cache once, at the first compile: re-point an open one explicitly.
      from jax.experimental.compilation_cache import compilation_cache
      compilation_cache.reset_cache()
    jax.config.update('jax_compilation_cache_dir', path)
  return path
