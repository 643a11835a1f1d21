"""Tokenizer training: losses go down, usage is tracked, dead codes restart, results reload."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from mvar_jax import api, train_tokenizer, vqvae
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
  return c


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
