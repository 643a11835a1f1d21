"""What the checkpoint integrity checks cost: digest at save, digest at restore, NaN guard.

    python launch/bench_checkpoint.py                       # the demo model (configs/demo.py)
    python launch/bench_checkpoint.py --config=configs/mvar_d16.py   # needs its memory
    JAX_NUM_CPU_DEVICES=8 python launch/bench_checkpoint.py --data=8  # state on 8 replicas

Builds the trainer's real state (params + AdamW moments and counts) for the config, then
times, after one warm-up call each: checkpointing.fingerprint (the per-leaf digest stored
with every save and recomputed on restore), lifecycle.all_finite (the guard before a save),
and an Orbax save and restore of the same state for scale. Prints a table (ms, GB/s).
The first save of a process is its own row: it includes Orbax's one-time work, e.g. the
per-replica slice programs of a state replicated over --data devices
(checkpointing.MIN_REPLICA_PARALLEL_SLICE_BYTES; --min_replica_parallel_slice_bytes=0 splits
every leaf, as Orbax does by default).
"""

import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Run configuration.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (the median is printed).')
flags.DEFINE_integer('data', 1, "Mesh 'data' axis: devices that each hold the whole state.")
flags.DEFINE_integer('min_replica_parallel_slice_bytes', None,
                     'Override checkpointing.MIN_REPLICA_PARALLEL_SLICE_BYTES.')
FLAGS = flags.FLAGS


def _median_ms(fn, repeats):
  fn()  # warm-up: compilation
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - t0))
  return sorted(times)[len(times) // 2]


def main(argv):
  del argv
  import jax
  from mvar_jax import checkpointing, lifecycle, train
  config = FLAGS.config
  if FLAGS.min_replica_parallel_slice_bytes is not None:
    checkpointing.MIN_REPLICA_PARALLEL_SLICE_BYTES = FLAGS.min_replica_parallel_slice_bytes
  config.mesh.data, config.mesh.fsdp, config.mesh.num_devices = FLAGS.data, 1, FLAGS.data
  setup = train.build(config, train.Schedule(10, 0, 10, 1e-3))
  state = train.init_state(setup, jax.random.key(0))
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
  gb = nbytes / 1e9
  rows = [('fingerprint (save and restore, each)',
           _median_ms(lambda: checkpointing.fingerprint(state), FLAGS.repeats)),
          ('all_finite guard (save)',
           _median_ms(lambda: lifecycle.all_finite(state), FLAGS.repeats))]
  with tempfile.TemporaryDirectory() as d:
    ckpt = checkpointing.Checkpointer(os.path.join(d, 'c'), async_save=False, max_to_keep=1)
    step = iter(range(1, 10_000))
    t0 = time.perf_counter()
    ckpt.save(next(step), state)
    rows.append(('first Orbax save of the process', 1e3 * (time.perf_counter() - t0)))
    rows.append(('Orbax save (incl. fingerprint)',
                 _median_ms(lambda: ckpt.save(next(step), state), FLAGS.repeats)))
    rows.append(('Orbax restore (incl. verify)',
                 _median_ms(lambda: ckpt.restore(setup.abstract_state), FLAGS.repeats)))
    ckpt.close()
  print(f'\nstate: {nbytes / 1e6:.1f} MB in {len(jax.tree_util.tree_leaves(state))} arrays on '
        f'{FLAGS.data} x {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); replica '
        f'parallel from {checkpointing.MIN_REPLICA_PARALLEL_SLICE_BYTES} bytes per part')
  print(f'| {"what":<40} | {"ms":>9} | {"GB/s":>7} |')
  print(f'|{"-" * 42}|{"-" * 11}|{"-" * 9}|')
  for name, ms in rows:
    print(f'| {name:<40} | {ms:9.2f} | {gb / (ms / 1e3):7.2f} |')


if __name__ == '__main__':
  app.run(main)
