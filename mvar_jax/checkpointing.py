"""Training checkpoints (Orbax), preemption handling and converted-weight loading.

    ckpt = Checkpointer(f'{workdir}/checkpoints', max_to_keep=3)
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(abstract_state)       # lands sharded as `abstract_state` says
    ...
    ckpt.save(step, state, meta={'step': step, ...})  # async; `meta` is small JSON

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<id>` and renames
it to `<step>` only once every host has finished, so a save cut short by a crash
or a kill leaves a tmp directory that `latest_step`/`restore` never consider (and
that the next start deletes). The trainer saves only states whose losses it has
checked, so the newest checkpoint is always a good one.

Preemption: `PreemptionWatcher` turns SIGTERM (what SLURM, Kubernetes and cloud
TPU/GPU preemption send first) into a flag that the loop polls once per step; on
multi-host runs it also asks JAX's preemption sync point, so that every host
decides to stop at the same step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, META = 'state', 'meta'


class Checkpointer:
  """A small Orbax CheckpointManager wrapper: one pytree state plus JSON metadata per step."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        # Leftovers of saves that never finished (tmp dirs) are removed at start-up.
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, META))

  def latest_step(self) -> int | None:
    """Newest finished step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, meta: Mapping[str, Any] | None = None) -> None:
    """Starts saving `state` (a pytree of jax.Arrays) at `step`; returns once it is on the host.

    With async saving the write to disk finishes in the background; the caller may
    donate or overwrite `state` right away (Orbax has copied it off the devices).
    """
    meta = dict(meta or {}, step=int(step))
    self._manager.save(int(step), args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave(state),
        META: ocp.args.JsonSave(_jsonable(meta)),
    }), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) of `step` (default: the newest), placed as `abstract_state` says.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set (e.g.
    from jax.eval_shape plus the trainer's shardings): every array is read straight
    into its shards, never materialised whole on one device.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no finished checkpoint in {self.directory}')
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=jax.tree_util.tree_map(_restore_args, abstract_state)),
        META: ocp.args.JsonRestore(),
    }))
    return restored[STATE], dict(restored[META] or {})

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no finished checkpoint in {self.directory}')
    args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=args)
    return dict(restored[META] or {})

  def restore_subtree(self, step: int | None, abstract_subtree: Mapping[str, Any]):
    """Only some top-level entries of the state (e.g. {'params': ...} for sampling)."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no finished checkpoint in {self.directory}')
    # Partial restore: reads the named keys and skips the others (PyTree handler on both sides).
    args = ocp.args.PyTreeRestore(
        item=dict(abstract_subtree),
        restore_args=jax.tree_util.tree_map(_restore_args, dict(abstract_subtree)),
        partial_restore=True)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
    return restored[STATE]

  def item_structure(self, step: int | None = None) -> dict:
    """Top-level keys of a saved state (e.g. to see whether it holds 'ema_params')."""
    step = self.latest_step() if step is None else int(step)
    meta = self._manager.item_metadata(step)
    tree = meta[STATE] if meta is not None and STATE in meta else None
    tree = getattr(tree, 'tree', tree)
    return dict(tree) if isinstance(tree, Mapping) else {}

  def wait(self) -> None:
    """Blocks until background writes are on disk (and raises their errors)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _restore_args(leaf):
  sharding = getattr(leaf, 'sharding', None)
  if sharding is None:
    return ocp.RestoreArgs()
  return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not np.isfinite(x):
    return repr(x)  # JSON has no nan/inf
  return x


# ----------------------------------------------------------------------------- preemption

class PreemptionWatcher:
  """Turns SIGTERM into a stop request the training loop polls (`should_stop(step)`).

    with PreemptionWatcher() as watcher:
      for step in ...:
        ...
        if watcher.should_stop(step):
          save; break

  The previous handler is restored on exit. Signal handlers can only be installed
  from the main thread; elsewhere the watcher relies on JAX's sync point alone.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._event = threading.Event()
    self.received: int | None = None

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
    self._event.set()
    logging.warning('received signal %d: will save a checkpoint and stop after this step', signum)

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
    if jax.process_count() > 1:
      try:
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except (ImportError, RuntimeError, AttributeError):  # no preemption service running
        return self.requested
    return self.requested


# ----------------------------------------------------------------------------- converted weights

def load_converted(directory: str, name: str) -> tuple[dict, dict]:
  """(config dict, params tree of numpy arrays) of `<dir>/<name>.*`; see mvar_jax.converted_io."""
  from mvar_jax import converted_io
  return converted_io.read_converted(directory, name)


def check_tree_matches(params, abstract_params, what: str) -> None:
  """Raises ValueError listing the paths whose presence or shape differs."""
  def flat(tree):
    return {jax.tree_util.keystr(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = flat(params), flat(abstract_params)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  misshaped = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  if missing or unexpected or misshaped:
    lines = [f'{what}: parameters do not match the configured model.']
    if missing:
      lines.append(f'  missing: {missing[:10]}')
    if unexpected:
      lines.append(f'  unexpected: {unexpected[:10]}')
    if misshaped:
      lines.append('  mis-shaped: ' + ', '.join(
          f'{k} {got[k]} vs {want[k]}' for k in misshaped[:10]))
    raise ValueError('\n'.join(lines))
