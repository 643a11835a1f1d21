"""Tokenizer training: losses go down, usage is tracked, dead codes restart, results reload."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import common as common_config
from mvar_jax import api, convert, tokenizer_recipes, train_tokenizer, vqvae
from mvar_jax.data import pipeline
from mvar_jax.evaluation import inception


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
  t.disc_start = disc_start
  t.disc_ndf, t.disc_layers = 8, 1  # 16 px: 8x8 -> 6x6 patch logits


def read_scalars(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  import tensorflow as tf
  acc = event_accumulator.EventAccumulator(logdir)
  acc.Reload()
  return {tag: [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
          for tag in acc.Tags()['tensors']}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny plain-recipe run (config, workdir, (cfg, params)), shared by the tests below."""
  workdir = str(tmp_path_factory.mktemp('tok'))
  config = tiny_config()
  return config, workdir, train_tokenizer.train_tokenizer(config, workdir)


def test_training_lowers_the_reconstruction_error_and_logs_usage(trained):
  config, workdir, (cfg, params) = trained
  scalars = read_scalars(os.path.join(workdir, 'tokenizer_logs'))
  l2 = scalars['tokenizer/l2']
  assert len(l2) == 3 and l2[-1] < 0.5 * l2[0]
  for pn in cfg.patch_nums:  # codebook health per scale, every logging window
    usage, ppl = scalars[f'tokenizer/usage_{pn}x{pn}'], scalars[f'tokenizer/perplexity_{pn}x{pn}']
    assert all(0.0 < u <= 1.0 for u in usage)
    assert all(1.0 <= p <= cfg.vocab_size for p in ppl)
  assert all(np.isfinite(v) for v in scalars['tokenizer/vq'])
  # Held-out reconstruction metrics at the end of the run; LPIPS is off (no weights).
  assert 8.0 < scalars['tokenizer_eval/psnr'][-1] < 60.0
  assert -1.0 < scalars['tokenizer_eval/ssim'][-1] <= 1.0
  assert 'tokenizer_eval/lpips' not in scalars
  # The result is a converted-format checkpoint that reloads to the same params.
  cfg2, params2 = api.load_converted(os.path.join(workdir, 'tokenizer'), 'vqvae')
  assert cfg2 == cfg
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A second call reuses the result instead of training again.
  msgpack = os.path.join(workdir, 'tokenizer', 'vqvae.msgpack')
  mtime = os.path.getmtime(msgpack)
  train_tokenizer.train_tokenizer(config, workdir)
  assert os.path.getmtime(msgpack) == mtime


def test_eval_tokenizer_mode_measures_the_exported_tokenizer(trained, tmp_path, capsys):
  from mvar_jax import lpips, tokenizer_eval
  config, workdir, (cfg, _) = trained
  config = ml_collections.ConfigDict(config.to_dict())
  config.tokenizer.lpips_weights = str(tmp_path / 'lpips_vgg.msgpack')
  lpips.save_params(config.tokenizer.lpips_weights, lpips.random_params(0)[0])
  results = tokenizer_eval.run(config, workdir)
  with open(os.path.join(workdir, 'tokenizer_eval.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  # The same held-out images and params as the trainer's final evaluation: the same PSNR.
  logged = read_scalars(os.path.join(workdir, 'tokenizer_logs'))
  np.testing.assert_allclose(saved['psnr'], logged['tokenizer_eval/psnr'][-1], rtol=1e-5)
  assert saved['num_images'] == config.tokenizer.eval_images
  assert saved['lpips'] > 0 and np.isfinite(saved['lpips'])
  assert saved['rfid'] is None  # no eval.inception configured
  assert len(saved['usage_per_scale']) == len(cfg.patch_nums)
  assert all(0 < u <= 1 for u in saved['usage_per_scale'])
  table = capsys.readouterr().out
  assert 'rFID             off' in table and f'PSNR (dB)        {saved["psnr"]:.4f}' in table
  # rFID from the evaluation's Inception features (random weights: a fixed feature map).
  inception_dir = str(tmp_path / 'inception')
  convert.save_converted(inception_dir, 'inception', inception.InceptionConfig(),
                         inception.random_params(0))
  config.eval = common_config.get_config().eval
  config.eval.inception, config.eval.inception_batch_size = inception_dir, 16
  with_rfid = tokenizer_eval.run(config, workdir)
  assert np.isfinite(with_rfid['rfid']) and with_rfid['rfid'] > 0
  assert with_rfid['psnr'] == saved['psnr']
  assert f'rFID             {with_rfid["rfid"]:.4f}' in capsys.readouterr().out
  config.tokenizer.checkpoint = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='no tokenizer at'):
    tokenizer_eval.run(config, workdir)


def test_dead_codes_move_onto_encoder_features():
  cfg = train_tokenizer.vqvae_config_from(tiny_config())
  params = jax.tree_util.tree_map(np.asarray, vqvae.random_params(cfg))  # no compiled init
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
  # Loss weights: LlamaGen's recipe on VAR's quantizer; the small one is the demo recipe.
  from mvar_jax import tokenizer_step
  w = tokenizer_step.LossWeights.from_config(tokenizer_config.get_config().tokenizer)
  assert (w.l1, w.l2, w.disc, w.disc_start, w.adaptive) == (0.0, 1.0, 0.5, 20_000, False)
  assert w.perceptual == 0.0  # no lpips_weights configured: the perceptual term is off
  t = tokenizer_config.get_config('small').tokenizer
  assert t.disc_weight > 0 and 0 < t.disc_start < t.steps and t.perceptual_weight > 0


# ============================================================================= crash safety

def _load_export(workdir):
  from flax import serialization
  with open(os.path.join(workdir, 'tokenizer', 'vqvae.msgpack'), 'rb') as f:
    return serialization.msgpack_restore(f.read())


@pytest.mark.slow
def test_sigterm_and_kill9_then_resume_end_bit_identical(tmp_path):
  """main.py on the tokenizer config with the GAN from step 2 on: SIGTERM, resume, kill -9,
  resume == never stopped (the discriminator and its optimizer resume with the rest)."""
  import main_process as mp
  from mvar_jax import lifecycle
  steps = 24
  config = tiny_config(steps=steps)
  config.tokenizer_only = True  # main.py trains the tokenizer alone
  t = config.tokenizer
  t.checkpoint_every, t.log_every, t.restart_dead_every = 4, 6, 4  # restarts at 4, 8, ..., 16
  gan_recipe(t, disc_start=2)  # every checkpoint (4, 8, ...) and kill lands in the GAN phase
  t.eval_images = 0
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
  disc_loss = read_scalars(os.path.join(full_dir, 'tokenizer_logs'))['tokenizer/disc_loss']
  assert all(d > 0 for d in disc_loss)  # the discriminator trained in every logged window
  assert not [n for n in os.listdir(cut_dir) if '.tmp-' in n]  # the export was renamed whole


def test_nonfinite_learning_rate_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match='tokenizer.lr must be a finite number, got nan'):
    train_tokenizer.train_tokenizer(tiny_config(lr=float('nan')), str(tmp_path))


def test_the_step_gives_its_convolutions_to_eigen_on_cpu():
  """The trainer's step compiles with the convolutional networks' XLA options
  (xla_cpu.conv_net_options): YNNPACK, which ran the convolutions on one core, takes none."""
  import functools
  import flax.linen as nn
  import jax.numpy as jnp
  import optax
  from mvar_jax import tokenizer_step
  from test_xla_cpu import conv_fusions
  config = tiny_config()
  gan_recipe(config.tokenizer, disc_start=5)  # the discriminator's convolutions too
  t = config.tokenizer
  cfg = train_tokenizer.vqvae_config_from(config)
  disc, disc_tx = tokenizer_step.discriminator_from_config(t)
  setup = dict(tok=vqvae.Tokenizer(cfg), tx=optax.adam(1e-3), disc=disc, disc_tx=disc_tx,
               weights=tokenizer_step.LossWeights.from_config(t), lpips_model=None)
  assert disc is not None

  def init(key):
    params = nn.unbox(vqvae.init_params(cfg, key)['params'])
    state = tokenizer_step.init_state(params, setup['tx'], disc, disc_tx, key, (16, 16, 3))
    return dict(state, step=jnp.zeros((), jnp.int32),
                since_hit=jnp.zeros((cfg.vocab_size,), jnp.int32),
                window_hits=jnp.zeros((len(cfg.patch_nums), cfg.vocab_size), jnp.int32))
  state = jax.eval_shape(init, jax.random.key(0))
  images = jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32)
  holds_conv = lambda jitted: conv_fusions(jitted.lower(state, images, None).compile())
  # If XLA stops giving YNNPACK the convolutions, this fails and says the option can go.
  assert holds_conv(jax.jit(functools.partial(train_tokenizer.train_step, **setup)))
  assert not holds_conv(train_tokenizer.jit_train_step(**setup))
