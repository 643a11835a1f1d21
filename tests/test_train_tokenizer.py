"""Tokenizer training: losses go down, usage is tracked, dead codes restart, results reload."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from mvar_jax import api, tokenizer_recipes, train_tokenizer, vqvae
from mvar_jax.data import pipeline


def tiny_config(steps=30, lr=3e-3):
  c = ml_collections.ConfigDict()
  c.data = pipeline.default_data_config()
  c.data.image_size = 16
  c.data.builtin_train_size = 256
  c.tokenizer = train_tokenizer.default_tokenizer_train_config()
  t = c.tokenizer
  t.ch, t.ch_mult, t.num_res_blocks, t.z_channels = 32, (1, 2), 1, 8
  t.vocab_size, t.patch_nums = 32, (1, 2, 4, 8)
  t.using_sa = t.using_mid_sa = False
  t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every = steps, 16, lr, 5, 10
  t.restart_dead_every = 10
  t.eval_images, t.eval_batch_size = 16, 16  # held-out reconstruction metrics at the end
  return c


def gan_recipe(t, disc_start):
  """The demo recipe's GAN (small discriminator, adaptive weight) from `disc_start` on."""
  t.update(tokenizer_recipes.loss_fields('demo', steps=3 * disc_start))
  t.disc_ndf, t.disc_layers = 8, 1  # 16 px: 8x8 -> 6x6 patch logits


def read_scalars(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  import tensorflow as tf
  acc = event_accumulator.EventAccumulator(logdir)
  acc.Reload()
  return {tag: [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
          for tag in acc.Tags()['tensors']}


def test_training_lowers_the_reconstruction_error_and_logs_usage(tmp_path):
  cfg, params = train_tokenizer.train_tokenizer(tiny_config(), str(tmp_path))
  scalars = read_scalars(str(tmp_path / 'tokenizer_logs'))
  l2 = scalars['tokenizer/l2']
  assert len(l2) == 3 and l2[-1] < 0.5 * l2[0]
  usage = scalars['tokenizer/usage']
  assert all(0.0 < u <= 1.0 for u in usage)
  assert all(np.isfinite(v) for v in scalars['tokenizer/vq'])
  # The result is a converted-format checkpoint that reloads to the same params.
  cfg2, params2 = api.load_converted(str(tmp_path / 'tokenizer'), 'vqvae')
  assert cfg2 == cfg
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A second call reuses the result instead of training again.
  mtime = os.path.getmtime(tmp_path / 'tokenizer' / 'vqvae.msgpack')
  train_tokenizer.train_tokenizer(tiny_config(), str(tmp_path))
  assert os.path.getmtime(tmp_path / 'tokenizer' / 'vqvae.msgpack') == mtime


def test_dead_codes_move_onto_encoder_features():
  cfg = train_tokenizer.vqvae_config_from(tiny_config())
  params = vqvae.init_params(cfg, jax.random.key(0))['params']
  params = jax.tree_util.tree_map(np.asarray, __import__('flax').linen.unbox(params))
  dead = np.zeros(cfg.vocab_size, bool)
  dead[[3, 7]] = True
  feats = np.full((5, cfg.z_channels), 9.0, np.float32)
  new = train_tokenizer.restart_dead_codes(params, dead, feats, np.random.default_rng(0))
  table = np.asarray(new['quantize']['embedding']['embedding'])
  old = params['quantize']['embedding']['embedding']
  np.testing.assert_allclose(table[[3, 7]], 9.0, atol=0.01)
  np.testing.assert_array_equal(np.delete(table, [3, 7], 0), np.delete(old, [3, 7], 0))


def test_divergence_stops_with_a_clear_error(tmp_path):
  with pytest.raises(FloatingPointError, match='tokenizer loss'):
    train_tokenizer.train_tokenizer(tiny_config(steps=3, lr=1e30), str(tmp_path))
  assert not os.path.exists(tmp_path / 'tokenizer' / 'vqvae.msgpack')


def test_mismatched_image_size_names_the_field(tmp_path):
  c = tiny_config()
  c.data.image_size = 32
  with pytest.raises(ValueError, match='data.image_size'):
    train_tokenizer.train_tokenizer(c, str(tmp_path))


def test_tokenizer_config_describes_the_released_architecture():
  from configs import tokenizer as tokenizer_config
  cfg = train_tokenizer.vqvae_config_from(tokenizer_config.get_config())
  abstract = jax.eval_shape(lambda: vqvae.init_params(cfg, jax.random.key(0)))['params']
  assert vqvae.count_params(abstract) == 108_948_355
  assert cfg.resolution == 256
  small = train_tokenizer.vqvae_config_from(tokenizer_config.get_config('small'))
  assert small.resolution == 32 and small.patch_nums[-1] == 8


# ============================================================================= crash safety

def _load_export(workdir):
  from flax import serialization
  with open(os.path.join(workdir, 'tokenizer', 'vqvae.msgpack'), 'rb') as f:
    return serialization.msgpack_restore(f.read())


@pytest.mark.slow
def test_sigterm_and_kill9_then_resume_end_bit_identical(tmp_path):
  """main.py on the tokenizer config: SIGTERM, resume, kill -9, resume == never stopped."""
  import main_process as mp
  from mvar_jax import lifecycle
  steps = 24
  config = tiny_config(steps=steps)
  config.tokenizer_only = True  # main.py trains the tokenizer alone
  t = config.tokenizer
  t.checkpoint_every, t.log_every, t.restart_dead_every = 4, 6, 4  # restarts at 4, 8, ..., 16
  cfg_path = mp.write_config(str(tmp_path), config)
  full_dir, cut_dir = str(tmp_path / 'full'), str(tmp_path / 'cut')
  ckpts = os.path.join(cut_dir, 'tokenizer_train', 'checkpoints')

  run = lambda workdir, log: mp.MainProcess(cfg_path, workdir, log_path=str(tmp_path / log),
                                           cache_dir=str(tmp_path / 'xla_cache'))
  full = run(full_dir, 'full.log')  # first and alone: it fills the compilation cache
  assert full.wait() == lifecycle.EXIT_FINISHED, full.log()[-2000:]
  cut = run(cut_dir, 'cut1.log')
  cut.wait_for(lambda: mp.steps_in(ckpts), what='a first checkpoint')
  cut.terminate()
  assert cut.wait() == lifecycle.EXIT_PREEMPTED, cut.log()[-2000:]
  first = mp.steps_in(ckpts)[-1]
  assert first < steps and f'saved step {first}' in cut.log()
  assert not os.path.exists(os.path.join(cut_dir, 'tokenizer'))  # nothing exported yet

  cut = run(cut_dir, 'cut2.log')
  cut.wait_for(lambda: mp.steps_in(ckpts)[-1] > first, what='a later checkpoint')
  cut.kill()
  assert cut.wait() == -9
  assert f'resumed from step {first}' in cut.log()
  second = mp.steps_in(ckpts)[-1]

  cut = run(cut_dir, 'cut3.log')
  assert cut.wait() == lifecycle.EXIT_FINISHED, cut.log()[-2000:]
  assert f'resumed from step {second}' in cut.log() and second < steps

  jax.tree_util.tree_map(np.testing.assert_array_equal, _load_export(cut_dir),
                         _load_export(full_dir))
  assert not [n for n in os.listdir(cut_dir) if '.tmp-' in n]  # the export was renamed whole


def test_nonfinite_learning_rate_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match='tokenizer.lr must be a finite number, got nan'):
    train_tokenizer.train_tokenizer(tiny_config(lr=float('nan')), str(tmp_path))
