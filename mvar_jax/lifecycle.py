"""What every long job needs, once: lock, checkpoints, preemption, NaN guard, writers, exit codes.

    with lifecycle.Run(workdir, 'checkpoints', total_steps=n, max_to_keep=3) as run:
      restored = run.restore(abstract_state)          # newest step that reads and verifies
      for step in ...:
        ...
        if run.should_stop(step):                      # SIGTERM or the multi-host sync point
          run.save(step, state, meta); raise run.preempted(step)
        if step % every == 0: run.save(step, state, meta)   # refuses a non-finite state

Exit codes (main.py turns the exceptions below into them; launch scripts read them):
  EXIT_FINISHED = 0    the run reached its last step (or had already: a rerun is a no-op)
  EXIT_FAILED = 1      any other error (Python's default for an uncaught exception)
  EXIT_NONFINITE = 3   stopped on a NaN/Inf; the message names the last good checkpoint
  EXIT_LOCKED = 4      another live run holds the workdir lock
  EXIT_PREEMPTED = 143 stopped on SIGTERM (or the preemption sync point) after saving;
                       128 + SIGTERM, the status a shell reports for a SIGTERM'd job, which
                       SLURM requeue wrappers and Kubernetes already read as "preempted,
                       run again"; a finished run never exits with it.

Workdir lock. Process 0 holds an exclusive `flock` on `<workdir>/.lock` for the whole
run, with {pid, host, started} written inside. The kernel drops the lock when the holder
exits in any way (kill -9 included), so a dead run never blocks the next one; a live one
makes the second fail at once with an error naming the holder's pid and host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mvar_jax import checkpointing

EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_NONFINITE = 3
EXIT_LOCKED = 4
EXIT_PREEMPTED = 143  # 128 + SIGTERM


class Preempted(Exception):
  """The run saved its state after a stop request and stopped; rerun to continue."""

  def __init__(self, step: int, directory: str):
    self.step, self.directory = step, directory
    super().__init__(f'preempted: saved step {step} in {directory} and stopped; rerun the same '
                     f'command to continue (exit code {EXIT_PREEMPTED})')


class NonFiniteError(FloatingPointError):
  """A NaN or Inf in the loss or in the state about to be saved; the message names the step."""


class WorkdirLockedError(RuntimeError):
  """Another live run writes to this workdir."""


def exit_code(error: BaseException | None) -> int:
  """The documented exit code for how a run ended (None: it finished)."""
  if error is None:
    return EXIT_FINISHED
  if isinstance(error, Preempted):
    return EXIT_PREEMPTED
  if isinstance(error, NonFiniteError):
    return EXIT_NONFINITE
  if isinstance(error, WorkdirLockedError):
    return EXIT_LOCKED
  return EXIT_FAILED


# ============================================================================= workdir lock

class WorkdirLock:
  """An exclusive, non-blocking flock on `<workdir>/.lock` naming its holder (pid, host)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), '.lock')
    self._fd: int | None = None

  def acquire(self) -> 'WorkdirLock':
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirLockedError(
          f'{os.path.dirname(self.path)} is in use by another run: pid {holder.get("pid", "?")} '
          f'on host {holder.get("host", "?")} (started {holder.get("started", "?")}). Two runs '
          f'on one workdir overwrite each other\'s checkpoints: stop that run or pass another '
          f'--workdir. (The lock, {self.path}, is released when that process exits.)') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _read_holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or '{}')
  except (OSError, ValueError):
    return {}


# ============================================================================= preemption

class PreemptionWatcher:
  """Turns SIGTERM into a stop request the training loop polls (`should_stop(step)`).

  The previous handler is restored on exit. Signal handlers can only be installed
  from the main thread; elsewhere the watcher relies on JAX's sync point alone.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._event = threading.Event()
    self.received: int | None = None
    self.polled_step = 0  # the last step should_stop was asked about
    self.received_after: int | None = None  # polled_step when the signal came

  def __enter__(self) -> 'PreemptionWatcher':
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      logging.warning('not in the main thread: SIGTERM will not stop training cleanly')
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signum
    self.received_after = self.polled_step
    self._event.set()
    logging.warning('received signal %d after step %d: will save a checkpoint and stop after '
                    'the step in progress', signum, self.polled_step)

  def request_stop(self) -> None:
    """Same as receiving SIGTERM (for tests and callers that detect preemption otherwise)."""
    self._handle(int(signal.SIGTERM), None)

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def should_stop(self, step: int) -> bool:
    """True when this step should be the last: a local signal or a multi-host sync point.

    On several processes the local flag alone could make hosts stop at different
    steps (and deadlock a collective save); JAX's preemption sync point agrees on
    one step across hosts, so it decides there.
    """
    self.polled_step = int(step)
    if jax.process_count() > 1:
      try:
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except (ImportError, RuntimeError, AttributeError):  # no preemption service running
        return self.requested
    return self.requested


# ============================================================================= NaN guard

@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
  """Whether every float in `tree` is finite: one fused reduction where the arrays live."""
  return bool(jax.device_get(_all_finite(tree)))


# ============================================================================= the run

class Run:
  """Lock, Orbax checkpoints (verified, with fallback), preemption watcher, writer, progress.

  workdir: the run's directory (locked); ckpt_name: its checkpoint subdirectory;
  logdir: where the metric writer writes (default workdir).
  """

  def __init__(self, workdir: str, ckpt_name: str = 'checkpoints', *, total_steps: int,
               max_to_keep: int = 3, async_save: bool = True, logdir: str | None = None):
    self.workdir = os.path.abspath(workdir)
    self.total_steps = int(total_steps)
    self._ckpt_args = dict(directory=os.path.join(self.workdir, ckpt_name),
                           max_to_keep=max_to_keep, async_save=async_save)
    self.logdir = logdir or self.workdir
    self.lock = WorkdirLock(self.workdir) if jax.process_index() == 0 else None
    self.ckpt: checkpointing.Checkpointer | None = None
    self.watcher = PreemptionWatcher()
    self.writer = None
    self.good_step: int | None = None  # newest step saved (or restored) with a finite state

  def __enter__(self) -> 'Run':
    from clu import metric_writers  # imported here: pulls in TensorFlow
    if self.lock is not None:
      self.lock.acquire()
    try:
      self.ckpt = checkpointing.Checkpointer(**self._ckpt_args)
      self.writer = metric_writers.create_default_writer(
          self.logdir, just_logging=jax.process_index() > 0)
      self.watcher.__enter__()
    except BaseException:
      if self.lock is not None:
        self.lock.release()
      raise
    return self

  def __exit__(self, *exc) -> None:
    try:
      self.watcher.__exit__(*exc)
      # Also on errors: the background write of the last good checkpoint must land first.
      if self.ckpt is not None:
        self.ckpt.close()
      if self.writer is not None:
        self.writer.flush()
        self.writer.close()
    finally:
      if self.lock is not None:
        self.lock.release()

  @property
  def directory(self) -> str:
    return self._ckpt_args['directory']

  def progress_hooks(self) -> list:
    """CLU's ReportProgress: steps/s to the writer and the ETA in the log, once a minute."""
    from clu import periodic_actions
    return [periodic_actions.ReportProgress(num_train_steps=self.total_steps, writer=self.writer)]

  def restore(self, abstract_state):
    """(state, meta) of the newest good step, or None when the run starts fresh."""
    out = self.ckpt.restore_latest_good(abstract_state)
    if out is not None:
      self.good_step = int(out[1]['step'])
      logging.info('resumed from step %d of %s', self.good_step, self.directory)
    return out

  def last_good(self) -> str:
    return ('none' if self.good_step is None
            else f'step {self.good_step} in {self.directory}')

  def save(self, step: int, state, meta: Mapping[str, Any] | None = None) -> None:
    """Saves `state` at `step` if every float in it is finite, else raises NonFiniteError."""
    if not all_finite(state):
      raise NonFiniteError(
          f'the state after step {step} holds NaN/Inf values; it was not saved. Last good '
          f'checkpoint: {self.last_good()}. Lower the learning rate before resuming from it.')
    self.ckpt.save(step, state, meta=meta)
    self.good_step = int(step)

  def should_stop(self, step: int) -> bool:
    return self.watcher.should_stop(step)

  def preempted(self, step: int) -> Preempted:
    logging.warning('stopping at step %d after a preemption signal received after step %s '
                    '(checkpoint saved)', step, self.watcher.received_after)
    self.ckpt.wait()  # the saved step must be on disk before the process exits
    return Preempted(step, self.directory)


def finished_metrics(meta: Mapping[str, Any]) -> dict[str, float] | None:
  """The final metrics a finished run stored in its last checkpoint's metadata, or None."""
  out = meta.get("final_metrics")
  return None if out is None else {k: float(v) for k, v in out.items()}
