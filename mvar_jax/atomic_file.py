"""Files that appear whole or not at all: write to a temporary name, fsync, rename.

    write_atomically(path, lambda f: np.savez(f, **arrays))

A crash (kill -9, power cut) mid-write leaves at most a hidden `.NAME.tmp-PID-THREAD` beside
the target, never a truncated target. `fsync_dir` makes the renames in a directory durable.
"""

from __future__ import annotations

import os
import threading
from typing import BinaryIO, Callable


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
  """Calls write(f) on a temporary file next to `path`, fsyncs it and renames it to `path`."""
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                     f'.{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}')
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def fsync_dir(path: str) -> None:
  """Makes the renames in directory `path` durable (best effort: not every filesystem can)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
