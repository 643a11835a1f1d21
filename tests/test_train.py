"""The trainer: schedules, decay mask, segment order, loss, config errors, and real runs.

The end-to-end tests train a 2-block, width-32 transformer on random token ids over a tiny
randomly initialised VQ-VAE (patch nums 1,2,3,4; refine_step 3; kernel 3) on one CPU device.
"""

import glob
import math
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from mvar_jax import checkpointing, config_utils, convert, lifecycle, sharding, train, xla_cpu
from mvar_jax import transformer as tfm
from mvar_jax import vqvae as vq
from mvar_jax.data import token_cache

PATCH_NUMS = (1, 2, 3, 4)
L = sum(p * p for p in PATCH_NUMS)  # 30 tokens
VOCAB = 16


# ============================================================================= segments

def test_segment_sequence_ratio_k8_K10_refine8():
  seq = [train.segment_at(g, schedule='segments', num_scales=10, refine_step=8, ratio_k=8)
         for g in range(30)]
  cycle = [(0, 7)] * 8 + [(8, 8), (9, 9)]
  assert seq == cycle * 3
  assert train.segments('segments', 10, 8) == [(0, 7), (8, 8), (9, 9)]
  assert train.segments('all', 10, 8) == [(0, 9)]
  assert train.segment_at(5, schedule='all', num_scales=10, refine_step=8, ratio_k=8) == (0, 9)


def test_every_large_scale_is_trained_once_per_cycle_even_when_they_outnumber_ratio_k():
  """Four large scales (6..9) and ratio_k 2: upstream's `c % ratio_k` would give 6, 7, 6, 7."""
  seq = [train.segment_at(g, schedule='segments', num_scales=10, refine_step=6, ratio_k=2)
         for g in range(12)]
  assert seq == ([(0, 5)] * 2 + [(6, 6), (7, 7), (8, 8), (9, 9)]) * 2
  ones = [train.segment_at(g, schedule='segments', num_scales=10, refine_step=8, ratio_k=1)
          for g in range(6)]
  assert ones == [(0, 7), (8, 8), (9, 9)] * 2  # upstream's ratio_k == 1 branch: c - 1


# ============================================================================= loss

def test_cross_entropy_matches_optax_with_label_smoothing():
  logits = jax.random.normal(jax.random.key(0), (3, 5, VOCAB))
  targets = jax.random.randint(jax.random.key(1), (3, 5), 0, VOCAB)
  loss, nll = train.cross_entropy(logits, targets, 0.1)
  smoothed = optax.smooth_labels(jax.nn.one_hot(targets, VOCAB), 0.1)
  np.testing.assert_allclose(loss, optax.softmax_cross_entropy(logits, smoothed), rtol=1e-5)
  np.testing.assert_allclose(nll, optax.softmax_cross_entropy_with_integer_labels(logits, targets),
                             rtol=1e-5)


def test_train_loss_weights_every_token_by_one_over_L(tiny_tokenizer):
  """Segment loss = sum over its tokens of CE / L, batch mean: checked against eval's sums."""
  tokenizer, vparams = tiny_tokenizer
  cfg = tfm.TransformerConfig(depth=1, width=32, num_heads=2, vocab_size=VOCAB, cvae=4,
                              num_classes=10, patch_nums=PATCH_NUMS, cond_drop_rate=0.0,
                              attention=tfm.AttentionConfig(refine_step=3, kernel_size=3))
  model = tfm.MVARTransformer(cfg)
  params = jax.jit(lambda k: nn.unbox(tfm.init_params(cfg, k)['params']))(jax.random.key(0))
  tx = optax.sgd(0.0)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
  rng = np.random.default_rng(0)
  b = 4
  batch = {'ids': jnp.asarray(rng.integers(0, VOCAB, (b, L)), jnp.int32),
           'label': jnp.asarray(rng.integers(0, 10, (b,)), jnp.int32)}
  tok_params = {'quantize': vparams['quantize']}
  step = jax.jit(lambda s, bt, p: train.train_step(
      s, bt, jax.random.key(0), p, model=model, tokenizer=tokenizer, tx=tx, first=0, last=2))
  _, m = step(state, batch, tok_params)
  ev = jax.jit(lambda p, bt, tp: train.eval_step(p, bt, tp, model=model, tokenizer=tokenizer))(
      params, batch, tok_params)
  # No dropout in this model: the training forward equals the all-scales eval forward.
  np.testing.assert_allclose(m['nll_K'][:3], ev['nll_K'][:3], rtol=1e-5)
  assert float(m['loss']) == pytest.approx(float(np.sum(ev['nll_K'][:3])) / (b * L), rel=1e-5)
  np.testing.assert_array_equal(m['count_K'], [b * 1, b * 4, b * 9, 0])
  np.testing.assert_array_equal(ev['count_K'], [b * 1, b * 4, b * 9, b * 16])
  assert float(np.sum(ev['nll_K'])) / (b * L) == pytest.approx(math.log(VOCAB), rel=0.05)


# ============================================================================= config validation

@pytest.mark.parametrize('field, value, message', [
    ('train.schedule', 'random',
     r"train.schedule must be one of \('segments', 'all'\), got 'random'"),
    ('train.lr_schedule', 'step',
     r"train.lr_schedule must be one of \('lin0', 'lin', 'lin00', 'cos', 'constant'\)"),
    ('model.dtype', 'fp8', r"model.dtype must be one of \('float32', 'bfloat16', 'float16'\)"),
    ('model.attention_mode', 'full', r"model.attention_mode must be one of \('mvar', 'var'\)"),
    ('train.batch_size', 0, 'train.batch_size must be > 0'),
    ('train.grad_clip', None, 'train.grad_clip must be a finite number, got None'),
    ('model.refine_step', None, 'model.refine_step must be a finite number, got None'),
    ('train.label_smoothing', 1.5, r'train.label_smoothing must be in \[0.0, 1.0\)'),
    ('train.ema_decay', 1.0, r'train.ema_decay must be in \[0.0, 1.0\)'),
    ('model.refine_step', 11, r'model.refine_step must be in \[0, 10\]'),
    ('sample.top_p', 0.0, r'sample.top_p must be in \(0, 1\]'),
    ('sample.decoder_dtype', 'fp8', r"sample.decoder_dtype must be one of \('', 'float32'"),
    ('sample.param_dtype', 'bf16',
     r"sample.param_dtype must be one of \('', 'float32', 'bfloat16'\), got 'bf16'"),
    ('mesh.data', 3, r'mesh.data \* mesh.fsdp must equal the device count'),
    ('train.batch_size', 12, r'train.batch_size \(12\) must be a multiple of the batch shards'),
    ('data.name', 'cifar', "data.name='cifar' is invalid"),
    ('tokenizer.checkpoint', '', 'tokenizer.checkpoint must name a converted VQ-VAE directory'),
])
def test_invalid_config_names_the_field(field, value, message):
  c = common.get_config()
  c.tokenizer.checkpoint = '/somewhere'
  c.train.batch_size = 16
  config_utils.validate_config(c)  # the baseline is valid
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_utils.validate_config(c)


def test_sampling_decodes_in_fp32_on_cpu_unless_the_config_names_a_dtype():
  c = common.get_config()
  assert c.model.dtype == 'bfloat16' and c.sample.decoder_dtype == ''
  assert jax.default_backend() == 'cpu'
  assert train.decoder_dtype(c) == 'float32'  # auto: bf16 convs are emulated on CPU
  c.sample.decoder_dtype = 'bfloat16'
  assert train.decoder_dtype(c) == 'bfloat16'


def test_model_configs_load_and_validate():
  import importlib
  for name, depth, batch in (('mvar_d16', 16, 448), ('mvar_d20', 20, 768), ('mvar_d24', 24, 768),
                             ('mvar_d30', 30, 1024), ('mvar_d16_finetune', 16, 448),
                             ('mvar_d20_finetune', 20, 192), ('mvar_d24_finetune', 24, 448)):
    c = importlib.import_module(f'configs.{name}').get_config()
    assert c.model.depth == depth and c.train.batch_size == batch, name
    assert bool(c.init_from) == name.endswith('finetune'), name
    tc = config_utils.transformer_config_from(c)
    assert tc.width == 64 * depth and tc.num_heads == depth
    assert tc.drop_path_rate == pytest.approx(0.1 * depth / 24)
    c.tokenizer.checkpoint = '/x'
    config_utils.validate_config(c, check_mesh=False)
  c = importlib.import_module('configs.mvar_d16').get_config('runlocal')
  assert c.model.depth == 2
  sched = train.Schedule.from_config(c, data_steps_per_epoch=None)
  assert (sched.total_steps, sched.warmup_steps) == (20, 2)
  with pytest.raises(ValueError, match="unknown config arg 'fast'"):
    importlib.import_module('configs.mvar_d16').get_config('fast')


# ============================================================================= end to end

@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs of this module compile the same steps again (restarts): reuse the executables."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield
  for n, v in before.items():
    jax.config.update(n, v)


@pytest.fixture(scope='module')
def tiny_tokenizer():
  # No down-sampling level: the tests feed token ids, so only the quantiser ever runs.
  cfg = vq.VQVAEConfig(ch=8, ch_mult=(1,), num_res_blocks=1, z_channels=4, vocab_size=VOCAB,
                       patch_nums=PATCH_NUMS, norm_groups=4, using_sa=False, using_mid_sa=False)
  # Random values in the initialiser's shapes: compiling VQVAE.init costs more than this module.
  shapes = jax.eval_shape(lambda: nn.unbox(vq.init_params(cfg, jax.random.key(0))['params']))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  return vq.Tokenizer(cfg), params


@pytest.fixture(scope='module')
def assets(tmp_path_factory, tiny_tokenizer):
  """A converted tiny VQ-VAE directory and a token cache of random fixed ids."""
  root = tmp_path_factory.mktemp('assets')
  tokenizer, params = tiny_tokenizer
  convert.save_converted(str(root / 'tok'), 'vqvae', tokenizer.config, params)
  rng = np.random.default_rng(0)
  for split, n in (('train', 48), ('val', 12)):
    ids = rng.integers(0, VOCAB, (n, L))
    labels = rng.integers(0, 10, (n,))
    fake_images = [{'image': np.zeros((n, 1, 1, 3), np.float32), 'label': labels}]
    token_cache.build_token_cache(fake_images, lambda _, ids=ids: ids, str(root / 'cache' / split),
                                  num_scales_len=L, vocab_size=VOCAB, patch_nums=PATCH_NUMS,
                                  image_size=32)
  return root


def tiny_config(assets, **train_overrides):
  c = common.get_config()
  c.data.name, c.data.data_dir, c.data.num_classes = 'tokens', str(assets / 'cache'), 10
  c.data.image_size = 32  # what the cache was built for
  c.tokenizer.checkpoint = str(assets / 'tok')
  m = c.model
  m.depth, m.width, m.num_heads, m.num_classes, m.vocab_size, m.cvae = 2, 32, 2, 10, VOCAB, 4
  m.patch_nums, m.refine_step, m.kernel_size, m.dtype = PATCH_NUMS, 3, 3, 'float32'
  c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 1, 1, 1
  t = c.train
  t.batch_size, t.num_steps, t.ratio_k, t.epochs = 8, 6, 2, 1.0
  t.tblr = 1e-2  # big enough that parameters visibly move in 6 steps
  t.log_every, t.checkpoint_every, t.eval_every, t.sample_every = 2, 2, 3, 0
  t.eval_batches, t.profile_steps, t.sample_images = 1, 0, 4
  t.ema_decay = 0.5
  t.update(train_overrides)
  return c


def _read_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0})
  acc.Reload()
  return set(acc.Tags()['tensors'])


def _final_state(config, workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  step = ckpt.latest_step()
  sched = train.Schedule.from_config(config, data_steps_per_epoch=6)
  setup = train.build(config, sched)
  state, meta = ckpt.restore(setup.abstract_state)
  ckpt.close()
  return step, jax.device_get(state), meta


@pytest.fixture(scope='module')
def uninterrupted(assets, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('full'))
  config = tiny_config(assets, sample_every=6)
  metrics = train.train_and_evaluate(config, workdir)
  return config, workdir, metrics


def test_end_to_end_writes_checkpoints_events_and_metrics(uninterrupted):
  config, workdir, metrics = uninterrupted
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(f'{workdir}/checkpoints/[0-9]*'))
  assert steps == [2, 4, 6]
  assert glob.glob(f'{workdir}/events.out.tfevents.*')
  tags = _read_tags(workdir)
  for si, pn in enumerate(PATCH_NUMS):
    for kind in ('train_loss', 'train_acc', 'val_loss', 'val_acc'):
      assert f'{kind}/s{si:02d}_{pn}x{pn}' in tags
  assert {'train/loss', 'train/lr', 'train/grad_norm', 'val/loss', 'steps_per_sec',
          'samples'} <= tags
  assert all(np.isfinite(v) for v in metrics.values())
  step, state, _ = _final_state(config, workdir)
  assert step == 6 and int(state['step']) == 6 and 'ema_params' in state


def test_resume_after_preemption_is_exact(uninterrupted, assets, tmp_path):
  """Killed (SIGTERM) at step 3 and restarted: same final params and metrics as never stopped."""
  config, full_dir, full_metrics = uninterrupted
  workdir = str(tmp_path / 'resumed')
  config = tiny_config(assets, sample_every=6)

  def kill_at_3(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(lifecycle.Preempted, match='saved step 3'):
    train.train_and_evaluate(config, workdir, step_hook=kill_at_3)
  assert checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step() == 3
  resumed_metrics = train.train_and_evaluate(config, workdir)

  _, full, _ = _final_state(config, full_dir)
  _, resumed, _ = _final_state(config, workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, full)
  # The last log window (steps 5-6) and the final evaluation are identical.
  assert resumed_metrics.keys() == full_metrics.keys()
  for k in full_metrics:
    assert resumed_metrics[k] == full_metrics[k], k


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(assets, tmp_path):
  """An absurd learning rate blows the weights up; the loss of step 2 is NaN."""
  workdir = str(tmp_path / 'nan')
  config = tiny_config(assets, tblr=1e30, checkpoint_every=1, log_every=10, eval_every=0)
  with pytest.raises(train.NonFiniteLossError, match=r'\(NaN/Inf\) at step 2 .*Last good '
                     r'checkpoint: step 1'):
    train.train_and_evaluate(config, workdir)
  step, state, _ = _final_state(config, workdir)
  assert step == 1 and int(state['step']) == 1
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state['params']))


def _all_finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_the_checkpoint_a_nan_stop_names_is_finite(assets, tmp_path):
  """tblr=1e6, a checkpoint every step: the state after an update can be NaN while the loss
  checked (computed before that update) is finite. Such a state is never saved, and the
  checkpoint the message names holds finite params and optimiser state."""
  import re
  workdir = str(tmp_path / 'nan')
  config = tiny_config(assets, tblr=1e6, checkpoint_every=1, log_every=30, eval_every=0,
                       num_steps=12)
  with pytest.raises(lifecycle.NonFiniteError, match='Last good checkpoint: step') as e:
    train.train_and_evaluate(config, workdir)
  named = int(re.search(r'Last good checkpoint: step (\d+)', str(e.value)).group(1))
  step, state, _ = _final_state(config, workdir)
  assert step == named  # nothing newer was written
  assert _all_finite(state['params']) and _all_finite(state['opt_state'])


def test_a_finished_run_rerun_returns_its_final_metrics(uninterrupted):
  config, workdir, metrics = uninterrupted
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  again = train.train_and_evaluate(config, workdir)
  assert again == pytest.approx(metrics) and 'val/loss' in again and 'train/loss' in again
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_a_second_run_on_a_locked_workdir_names_the_holder(assets, tmp_path):
  import subprocess
  import sys
  import main_process as mp
  workdir = str(tmp_path / 'locked')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from mvar_jax import lifecycle; '
       'lifecycle.WorkdirLock(sys.argv[1]).acquire(); print("locked", flush=True); '
       'time.sleep(600)', workdir],
      cwd=mp.REPO, env=dict(os.environ, PYTHONPATH=mp.REPO, JAX_PLATFORMS='cpu'),
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(lifecycle.WorkdirLockedError,
                       match=rf'in use by another run: pid {holder.pid} on host '):
      train.train_and_evaluate(tiny_config(assets), workdir)
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))  # nothing was written
  finally:
    holder.kill()  # kill -9: the kernel drops the lock with the process
    holder.wait()
  lock = lifecycle.WorkdirLock(workdir).acquire()  # a dead holder never blocks
  lock.release()


def test_sigterm_saves_within_one_step_exits_143_then_resumes_and_finishes(assets, tmp_path):
  """main.py as a scheduler runs it: SIGTERM -> save, exit 143; rerun -> finish, exit 0;
  rerun of the finished run -> prints its final metrics, exit 0, trains nothing."""
  import re
  import main_process as mp
  config = tiny_config(assets, num_steps=40, log_every=30, checkpoint_every=1000, eval_every=0)
  cfg_path = mp.write_config(str(tmp_path), config)
  workdir = str(tmp_path / 'run')
  run = lambda log: mp.MainProcess(cfg_path, workdir, log_path=str(tmp_path / log),
                                   cache_dir=str(tmp_path / 'xla_cache'))
  first = run('first.log')
  first.wait_for(lambda: 'training from step 0' in first.log(), what='the loop to start')
  first.terminate()
  assert first.wait() == lifecycle.EXIT_PREEMPTED, first.log()[-3000:]
  after = int(re.search(r'received signal 15 after step (\d+)', first.log()).group(1))
  saved = mp.steps_in(os.path.join(workdir, 'checkpoints'))
  assert saved and saved[-1] <= after + 1 and saved[-1] < 40  # the step in progress, no more
  assert f'preempted: saved step {saved[-1]}' in first.log()

  second = run('second.log')
  assert second.wait() == lifecycle.EXIT_FINISHED, second.log()[-3000:]
  assert f'resumed from step {saved[-1]}' in second.log()
  assert mp.steps_in(os.path.join(workdir, 'checkpoints'))[-1] == 40

  third = run('third.log')
  assert third.wait() == lifecycle.EXIT_FINISHED, third.log()[-3000:]
  assert re.search(r'finished run \(.*step 40\): .*train/loss=', third.log())
  assert 'training from step' not in third.log()


@pytest.mark.parametrize('field, value', [('train.tblr', float('nan')),
                                          ('train.tblr', float('inf')),
                                          ('train.weight_decay', float('nan')),
                                          ('train.eps', float('nan')),
                                          ('train.grad_clip', float('-inf'))])
def test_non_finite_floats_are_refused_naming_the_field(field, value):
  c = common.get_config()
  c.tokenizer.checkpoint = '/somewhere'
  c.train.batch_size = 16
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=rf'{field} must be a finite number, got {value}'):
    config_utils.validate_config(c)


def test_a_segment_leaves_the_parameters_it_does_not_read_alone(tiny_tokenizer):
  """Segment A then the scale-3 segment: pos_start (read only from scale 0) keeps its value,
  moments and step count in the second step; the other parameters move."""
  tokenizer, vparams = tiny_tokenizer
  c = common.get_config()
  m = c.model
  m.depth, m.width, m.num_heads, m.num_classes, m.vocab_size, m.cvae = 1, 32, 2, 10, VOCAB, 4
  m.patch_nums, m.refine_step, m.kernel_size, m.dtype = PATCH_NUMS, 3, 3, 'float32'
  c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 1, 1, 1
  c.train.weight_decay = 0.05
  setup = train.build(c, train.Schedule(10, 0, 10, 1e-2))
  state = train.init_state(setup, jax.random.key(0))
  tok_params = jax.device_put({'quantize': vparams['quantize']}, setup.replicated)
  tok_sh = jax.tree_util.tree_map(lambda _: setup.replicated, tok_params)
  rng = np.random.default_rng(0)
  batch = lambda: {'ids': jnp.asarray(rng.integers(0, VOCAB, (4, L)), jnp.int32),
                   'label': jnp.asarray(rng.integers(0, 10, (4,)), jnp.int32)}
  assert train.segment_params(setup, 3, 3)['pos_start'] is False
  assert train.segment_params(setup, 0, 2)['pos_start'] is True
  step_a = train.compile_train_step(setup, tokenizer, tok_sh, first=0, last=2,
                                    label_smoothing=0.0, ema_decay=0.0)
  step_3 = train.compile_train_step(setup, tokenizer, tok_sh, first=3, last=3,
                                    label_smoothing=0.0, ema_decay=0.0)
  s1, _ = step_a(state, batch(), jax.random.key(1), tok_params)
  s1 = jax.device_get(s1)
  s2, _ = step_3(jax.device_put(s1, setup.state_shardings), batch(), jax.random.key(2),
                 tok_params)
  s2 = jax.device_get(s2)
  opt1, opt2 = s1['opt_state'], s2['opt_state']
  np.testing.assert_array_equal(s2['params']['pos_start'], s1['params']['pos_start'])
  np.testing.assert_array_equal(opt2.mu['pos_start'], opt1.mu['pos_start'])
  np.testing.assert_array_equal(opt2.nu['pos_start'], opt1.nu['pos_start'])
  assert int(opt2.count['pos_start']) == 1 and int(opt2.count['head']['kernel']) == 2
  assert not np.array_equal(s2['params']['head']['kernel'], s1['params']['head']['kernel'])


# ============================================================================= micro-batches

def test_micro_batches_take_the_step_of_the_whole_batch(tiny_tokenizer):
  """train.grad_accum_steps=4 on a batch sharded over 2 devices: the loss, metrics, gradient
  norm and updated parameters of the whole batch's step (without dropout; with it, each
  micro-batch draws its own masks)."""
  tokenizer, vparams = tiny_tokenizer
  c = common.get_config()
  m = c.model
  m.depth, m.width, m.num_heads, m.num_classes, m.vocab_size, m.cvae = 1, 32, 2, 10, VOCAB, 4
  m.patch_nums, m.refine_step, m.kernel_size, m.dtype = PATCH_NUMS, 3, 3, 'float32'
  m.drop_path_rate, m.cond_drop_rate = 0.0, 0.0
  c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 2, 1, 2
  c.train.grad_clip = 0.2  # in play: the clip sees the averaged gradients
  # AdamW's first update is ~lr * sign(g), blind to the gradient's size; with eps = 1 it is
  # ~lr * g, so the parameters compare the gradients themselves.
  c.train.eps = 1.0
  setup = train.build(c, train.Schedule(10, 0, 10, 1e-2))
  state = jax.device_get(train.init_state(setup, jax.random.key(0)))
  tok_params = jax.device_put({'quantize': vparams['quantize']}, setup.replicated)
  tok_sh = jax.tree_util.tree_map(lambda _: setup.replicated, tok_params)
  rng = np.random.default_rng(0)
  batch = {'ids': rng.integers(0, VOCAB, (8, L)).astype(np.int32),
           'label': rng.integers(0, 10, (8,)).astype(np.int32)}
  out = {}
  for k in (1, 4):
    step = train.compile_train_step(setup, tokenizer, tok_sh, first=0, last=2,
                                    label_smoothing=0.1, ema_decay=0.0, grad_accum_steps=k)
    new, metrics = step(jax.device_put(state, setup.state_shardings),
                        sharding.to_global_batch(batch, setup.batch_sharding),
                        jax.random.key(1), tok_params)
    out[k] = jax.device_get((new['params'], metrics))
  (p1, m1), (p4, m4) = out[1], out[4]
  assert float(m1["grad_norm"]) > 0.2  # clipped
  np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-6)
  np.testing.assert_allclose(m4['grad_norm'], m1['grad_norm'], rtol=1e-5)
  np.testing.assert_allclose(m4['nll_K'], m1['nll_K'], rtol=1e-5)
  np.testing.assert_array_equal(m4['count_K'], m1['count_K'])
  np.testing.assert_array_equal(m4['correct_K'], m1['correct_K'])
  def same_update(path, a, b, start):
    scale = float(np.max(np.abs(b - start)))
    # An update is only known to the float32 spacing of the parameter it is added to (the
    # two steps' GEMMs may round differently): at most 2 ulps of the largest parameter.
    ulps = 2 * float(np.max(np.spacing(np.abs(np.asarray(start, np.float32)))))
    np.testing.assert_allclose(a - start, b - start, rtol=1e-4, atol=1e-5 * scale + ulps,
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(same_update, p4, p1, state['params'])
  assert float(np.max(np.abs(p1['head']['kernel'] - state['params']['head']['kernel']))) > 0


def test_micro_batches_must_split_the_batch_evenly_over_the_shards():
  c = common.get_config()
  c.tokenizer.checkpoint = '/somewhere'
  c.train.batch_size = 12
  c.train.grad_accum_steps = 5
  with pytest.raises(ValueError, match=r'multiple of train.grad_accum_steps \(5\)'):
    config_utils.validate_config(c, check_mesh=False)
  c.train.grad_accum_steps = 4  # 12 = 4 micro-batches of 3, which 2 shards cannot split
  c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 2, 1, 2
  with pytest.raises(ValueError, match='times train.grad_accum_steps = 4'):
    config_utils.validate_config(c)
  c.train.grad_accum_steps = 0
  with pytest.raises(ValueError, match='train.grad_accum_steps must be an integer >= 1, got 0'):
    config_utils.validate_config(c)


def test_the_cpu_training_step_gives_ynnpack_its_matmuls_only():
  """XLA:CPU hands elementwise chains and reductions to YNNPACK by default, which wants their
  broadcast operands written out in full (a softmax's row sums as (B, H, Q, K) tensors); the
  training step compiles with YNNPACK's matmul fusions only. Elsewhere: no options."""
  assert dict(train.step_compiler_options('cpu')) == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}
  assert train.step_compiler_options('gpu') == () and train.step_compiler_options('tpu') == ()

  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((2, 4, 64, 32)), jnp.float32) for _ in range(2))

  def loss(q, k):  # softmax attention's pattern: matmul, row max and sum, divide, matmul
    probs = jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k), axis=-1)
    return jnp.sum(jnp.einsum('bhqk,bhkd->bhqd', probs, k) ** 2)

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, k)
  holds_dot = lambda hlo: {name: ' dot(' in body
                           for name, body in xla_cpu.ynn_fusions(hlo).items()}
  default = holds_dot(lowered.compile().as_text())
  ours = holds_dot(lowered.compile(dict(train.step_compiler_options('cpu'))).as_text())
  # If XLA stops giving YNNPACK anything but matmuls, the first assertion fails and says the
  # option can go.
  assert not all(default.values()), default
  assert ours and all(ours.values()), ours
