"""Entry point: train MVAR, or sample from a trained or converted checkpoint.

    python main.py --config=configs/mvar_d16.py --workdir=workdirs/d16 \
        --config.tokenizer.checkpoint=weights/vqvae
    python main.py --mode=sample --config=configs/mvar_d16.py --workdir=workdirs/d16 \
        --config.tokenizer.checkpoint=weights/vqvae [--config.sample.checkpoint=weights/mvar_d16]
    python main.py --mode=eval_tokenizer --config=configs/tokenizer.py --workdir=workdirs/vqvae

Config fields can be overridden on the command line (`--config.train.batch_size=64`).
Exit codes (mvar_jax/lifecycle.py): 0 finished, 143 preempted (SIGTERM: saved, rerun to
continue), 3 stopped on NaN/Inf, 4 workdir locked by another live run, 1 any other error.
`--mode=sample` writes `samples.npz` (ADM evaluator format: arr_0 uint8 (N, H, W, 3),
arr_1 int labels) and `samples.png` (a grid of the first images) to
config.sample.output_dir (default <workdir>/samples). `--mode=eval_tokenizer` measures the
tokenizer of config.tokenizer.checkpoint (default <workdir>/tokenizer) on held-out images
(PSNR, SSIM, LPIPS, rFID, codebook usage per scale; mvar_jax/tokenizer_eval.py), prints a
table and writes <workdir>/tokenizer_eval.json.
"""

import os

# TensorFlow (tf.data, TensorBoard writers) must never claim the accelerators JAX uses.
# Hiding GPUs through TF's own API has to happen before TF initialises them.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def _hide_gpus_from_tensorflow():
  try:
    import tensorflow as tf
  except ImportError:
    return
  tf.config.set_visible_devices([], 'GPU')


FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval_tokenizer'],
                  'train: train_and_evaluate; sample: sample config.sample.num_images images to '
                  'samples.npz; eval_tokenizer: reconstruction metrics of the tokenizer.')
config_flags.DEFINE_config_file('config', None, 'Run configuration (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('compilation_cache_dir', None, 'Persistent XLA compilation cache (a second '
                    'run loads executables instead of compiling); default $MVAR_COMPILATION_CACHE_DIR '
                    "or ~/.cache/mvar_jax/xla; 'none' turns it off.")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.mode != 'sample':  # sampling never starts TensorFlow: skip its 3 s import
    _hide_gpus_from_tensorflow()

  import jax  # after TF has been told to keep off the GPUs
  from mvar_jax import compilation_cache
  from mvar_jax import sharding
  from mvar_jax import train

  # Multi-host start-up must precede every other JAX call.
  how = sharding.initialize_distributed()
  logging.info('JAX %s: process %d of %d (%s), %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), how, jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  # Before the first compile: a rerun (a resumed job, sampling after training) loads the
  # executables of the run before it instead of compiling them again.
  cache_dir = compilation_cache.enable(FLAGS.compilation_cache_dir)
  logging.info('persistent compilation cache: %s', cache_dir or 'off')

  from mvar_jax import lifecycle
  try:
    if FLAGS.mode == 'train' and FLAGS.config.get('tokenizer_only', False):
      from mvar_jax import train_tokenizer
      train_tokenizer.train_tokenizer(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'train' and FLAGS.config.get('demo', False):
      from mvar_jax import demo  # tokenizer -> token cache -> MVAR -> samples -> report
      demo.run(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'eval_tokenizer':
      from mvar_jax import tokenizer_eval  # held-out PSNR, SSIM, LPIPS, rFID, codebook usage
      tokenizer_eval.run(FLAGS.config, FLAGS.workdir)
    else:
      from mvar_jax import sample_mode  # every device of every process, resumable shards
      sample_mode.run(FLAGS.config, FLAGS.workdir)
  except (lifecycle.Preempted, lifecycle.NonFiniteError, lifecycle.WorkdirLockedError) as e:
    # Expected endings of a long run: one line and a code a scheduler can act on.
    logging.error('%s', e)
    print(e, flush=True)
    raise SystemExit(lifecycle.exit_code(e)) from None


if __name__ == '__main__':
  app.run(main)
