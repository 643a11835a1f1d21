"""Training checkpoints (Orbax), preemption handling and converted-weight loading.

    ckpt = Checkpointer(f'{workdir}/checkpoints', max_to_keep=3)
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(abstract_state)       # lands sharded as `abstract_state` says
    ...
    ckpt.save(step, state, meta={'step': step, ...})  # async; `meta` is small JSON

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<id>` and renames
it to `<step>` only once every host has finished, so a save cut short by a crash
or a kill leaves a tmp directory that `latest_step`/`restore` never consider (and
that the next start deletes).

Integrity: every save stores, in the step's JSON metadata, a digest of each leaf of the
state (`fingerprint`: a position-weighted and a plain 32-bit sum of its raw bits, one
fused reduction on the devices that hold the leaf, so sharded states need no gather).
`restore` recomputes and compares them; `restore_latest_good` walks back from the
newest step: a step that cannot be read or whose digests differ is logged (step, file,
reason), moved aside to `<directory>.corrupt/` (never deleted), and the previous one
is tried. What to save and when (NaN guard, preemption) is mvar_jax/lifecycle.py's job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

STATE, META = 'state', 'meta'
CHECKSUMS = 'checksums'  # meta key: {leaf path: digest}
DIGEST = 'wsum32+sum32'  # name of the digest stored beside the checksums (see `fingerprint`)


class CorruptCheckpointError(RuntimeError):
  """A saved step that cannot be read or whose contents differ from their stored digest."""


# ----------------------------------------------------------------------------- digests

def _leaf_digest(x):
  """(2,) uint32: sum(bits * (2i + 1)) and sum(bits), mod 2^32.

  bits are the raw 8/16/32-bit words of the leaf, i their position. The first sum changes
  under any change of one word (odd weights are invertible mod 2^32) and under swaps; the
  plain second sum makes a random multi-word corruption slip through with probability
  ~2^-64. Not a cryptographic hash: it guards against storage faults, not an adversary.
  (A second position-weighted sum cost 3x more on CPU for little gain.)
  """
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    size = jnp.dtype(x.dtype).itemsize
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(size)
    if word is None:  # 8-byte leaves (x64 mode): two 32-bit words each
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
      bits = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
  i = jnp.arange(bits.shape[0], dtype=jnp.uint32)
  s1 = jnp.sum(bits * (2 * i + 1), dtype=jnp.uint32)
  s2 = jnp.sum(bits, dtype=jnp.uint32)
  return jnp.stack([s1, s2])


# (n, 2) uint32 for n leaves: one output, one transfer to the host.
_digests = jax.jit(lambda leaves: jnp.stack([_leaf_digest(x) for x in leaves]))


def fingerprint(tree) -> dict[str, str]:
  """{leaf path: 16 hex digits} of a pytree of arrays, computed where the arrays live.

  One jitted reduction per set of devices (one for a trainer's state on its mesh).
  """
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree)) if jax.tree_util.tree_leaves(
      tree) else ((), ())
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(leaves):
    devices = frozenset(x.sharding.device_set) if isinstance(x, jax.Array) else None
    groups.setdefault(devices, []).append(i)
  sums: dict[int, Any] = {}
  for idx in groups.values():
    out = np.asarray(jax.device_get(_digests([jnp.asarray(leaves[i]) for i in idx])))
    sums.update(zip(idx, out.tolist()))
  return {jax.tree_util.keystr(paths[i]): f'{int(v[0]):08x}{int(v[1]):08x}'
          for i, v in sorted(sums.items())}


# Orbax's replica-parallel saving splits an array held by several replicas (the 'data' axis)
# so that each replica writes a part. Every part is a `shard[slice]` that XLA compiles once
# per shape, slice and device: the first save of a process compiled 128 such programs for a
# one-block model on 8 CPU devices (5.7 of its 7 s), and as many for the biases and norms of
# a real model, whose parts are a few KiB. Arrays whose part would be under this size are
# written whole by one replica; the large matrices are still split.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20


def _type_handlers():
  """Orbax's standard handlers, the jax.Array one with the threshold above."""
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
      (jax.Array, th.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES)),
      (str, th.StringHandler()))


class Checkpointer:
  """A small Orbax CheckpointManager wrapper: one pytree state plus JSON metadata per step."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        # Leftovers of saves that never finished (tmp dirs) are removed at start-up.
        cleanup_tmp_directories=True)
    # Handlers named up front, so that a fresh manager can read a step's tree metadata.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                       META: ocp.JsonCheckpointHandler()})

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
    meta[CHECKSUMS] = fingerprint(state)
    meta['digest'] = DIGEST
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
    state, meta = restored[STATE], dict(restored[META] or {})
    self._verify(step, state, meta)
    return state, meta

  def _verify(self, step: int, state, meta: Mapping[str, Any]) -> None:
    want = meta.get(CHECKSUMS)
    if want is None:
      logging.warning('checkpoint step %d in %s has no checksums (written by an older '
                      'version): not verified', step, self.directory)
      return
    got = fingerprint(state)
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if bad:
      raise CorruptCheckpointError(
          f'{len(bad)} array(s) differ from the checksums saved with them: '
          + ', '.join(f'{k} (saved {want.get(k)}, read {got.get(k)})' for k in bad[:5]))

  def restore_latest_good(self, abstract_state):
    """(state, meta) of the newest step that reads and verifies, or None without any step.

    An unreadable or corrupt step is logged, moved aside and skipped. A saved tree that
    does not fit `abstract_state` (another model config) raises ValueError and moves
    nothing: that is a config error, not a damaged file.
    """
    steps = sorted(self.all_steps(), reverse=True)
    failed: list[tuple[int, Exception]] = []
    for step in steps:
      self._check_structure(step, abstract_state)
      try:
        out = self.restore(abstract_state, step)
      except Exception as e:  # noqa: BLE001 -- any read failure means: try the previous step
        logging.warning('checkpoint step %d in %s failed to restore (%s): trying the previous '
                        'step', step, self.directory, type(e).__name__)
        failed.append((step, e))
        continue
      # Only once an older step restored are the newer ones set aside: a failure that every
      # step shares (a bug, a missing library) must not move good checkpoints.
      for bad_step, error in failed:
        self._quarantine(bad_step, error)
      return out
    if steps:
      raise CorruptCheckpointError(
          f'none of the checkpoints {steps} in {self.directory} could be restored (nothing was '
          'moved or deleted). Reasons: ' + '; '.join(
              f'step {st}: {type(e).__name__}: {" ".join(str(e).split())[:300]}'
              for st, e in failed))
    return None

  def _check_structure(self, step: int, abstract_state) -> None:
    try:
      meta = self._manager.item_metadata(step)
      tree = meta[STATE]
      tree = getattr(tree, 'tree', tree)
      saved = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                                     tree)
    except Exception:  # noqa: BLE001 -- unreadable metadata: restore fails and falls back
      return
    if not jax.tree_util.tree_leaves(saved):
      return
    check_tree_matches(saved, abstract_state,
                       f'checkpoint step {step} in {self.directory} (saved) vs the configured state')

  def _quarantine(self, step: int, error: Exception) -> None:
    """Logs one paragraph about the failed step and moves its directory aside."""
    step_dir = os.path.join(self.directory, str(step))
    reason = ' '.join(str(error).split())
    files = sorted(set(m for m in re.findall(r'[\w./:-]*' + re.escape(step_dir) + r'[\w./-]*',
                                             reason)))
    aside_root = self.directory + '.corrupt'
    aside = os.path.join(aside_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    logging.error(
        'checkpoint step %d could not be restored and is set aside. Step directory: %s. '
        'File: %s. Reason: %s: %s. It is moved to %s (not deleted); the run resumes from the '
        'newest step that restored and verified.',
        step, step_dir, ', '.join(files) if files else '(see reason)', type(error).__name__,
        reason[:600], aside)
    if jax.process_index() == 0:
      os.makedirs(aside_root, exist_ok=True)
      os.rename(step_dir, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'quarantine {self.directory} {step}')
    self._manager.reload()

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


def __getattr__(name):
  # The preemption watcher moved to mvar_jax.lifecycle (with the rest of the run policy).
  if name == 'PreemptionWatcher':
    from mvar_jax import lifecycle
    return lifecycle.PreemptionWatcher
  raise AttributeError(name)


# ----------------------------------------------------------------------------- converted weights

def load_converted(directory: str, name: str, *, leaf_fn=None) -> tuple[dict, dict]:
  """(config dict, params tree of numpy arrays) of `<dir>/<name>.*`; see mvar_jax.converted_io
  (`leaf_fn` is applied to each array as it is read)."""
  from mvar_jax import converted_io
  return converted_io.read_converted(directory, name, leaf_fn=leaf_fn)


def check_tree_matches(params, abstract_params, what: str) -> None:
  """Raises convert.CheckpointMismatchError (a ValueError) listing every path whose presence
  or shape differs between `params` and `abstract_params` (e.g. from jax.eval_shape)."""
  from mvar_jax.convert import CheckpointMismatchError

  def flat(tree):
    return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                     for k in p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = flat(params), flat(abstract_params)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  misshaped = [(k, got[k], want[k]) for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError(what, missing, unexpected, misshaped)
