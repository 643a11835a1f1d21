"""Two real JAX processes on this machine (launch/local_multiprocess.py) against one process.

2 processes x 4 CPU devices (gloo collectives), mesh (data=4, fsdp=2) across both: a one-block
model in the demo's layout trains from a token cache, is killed with SIGKILL, resumes, and must
give the losses and params of one process with 8 devices; sampling from it on 2 processes gives
the bytes of one device; the data sources give each process disjoint examples.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import demo as demo_config
from mvar_jax import checkpointing, convert, sample_mode, train
from mvar_jax import vqvae as vq
from mvar_jax.data import token_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, 'launch', 'local_multiprocess.py')
NUM_STEPS = 6

pytestmark = pytest.mark.slow


def launch(*command, cpu_devices=4):
  """The launcher running `command` in 2 processes (a process group of their own); the Popen."""
  cmd = [sys.executable, LAUNCHER, '--num_processes=2', f'--cpu_devices={cpu_devices}',
         '--grace_s=5', '--', sys.executable, *command]
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=ROOT, start_new_session=True)


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  """Demo-size tokenizer (random weights) and a token cache of random ids in its layout."""
  root = tmp_path_factory.mktemp('mp_assets')
  c = demo_config.get_config()
  t = c.tokenizer
  vcfg = vq.VQVAEConfig(ch=t.ch, ch_mult=tuple(t.ch_mult), num_res_blocks=t.num_res_blocks,
                        z_channels=t.z_channels, vocab_size=t.vocab_size,
                        patch_nums=tuple(t.patch_nums), using_sa=False, using_mid_sa=False)
  shapes = jax.eval_shape(lambda: nn.unbox(vq.init_params(vcfg, jax.random.key(0))['params']))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  convert.save_converted(str(root / 'tok'), 'vqvae', vcfg, params)
  length = sum(p * p for p in t.patch_nums)
  for split, n in (('train', 64), ('val', 16)):
    ids = rng.integers(0, t.vocab_size, (n, length))
    labels = rng.integers(0, 10, (n,))
    images = [{'image': np.zeros((n, 1, 1, 3), np.float32), 'label': labels}]
    token_cache.build_token_cache(images, lambda _, ids=ids: ids, str(root / 'cache' / split),
                                  num_scales_len=length, vocab_size=t.vocab_size,
                                  patch_nums=tuple(t.patch_nums), image_size=32)
  return root


def overrides(assets):
  return {'demo': False, 'seed': 5, 'data.name': 'tokens', 'data.data_dir': str(assets / 'cache'),
          'tokenizer.checkpoint': str(assets / 'tok'), 'mesh.data': 4, 'mesh.fsdp': 2,
          # One narrow block: the processes compile the step and the sampler three times over,
          # and what is tested (the collectives, the data split, resume) does not need depth.
          'model.depth': 1, 'model.width': 64, 'model.num_heads': 2,
          'train.batch_size': 16, 'train.num_steps': NUM_STEPS, 'train.warmup_epochs': 0.5,
          'train.log_every': 1, 'train.checkpoint_every': 2, 'train.keep_checkpoints': 5,
          'train.eval_every': 0, 'train.eval_batches': 1,
          'sample.num_images': 8, 'sample.batch_size': 4}


def finish(proc, timeout=600) -> str:
  """Waits for a launch; on timeout kills the launcher and its processes and fails with the log."""
  try:
    return proc.communicate(timeout=timeout)[0]
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f'timed out after {timeout} s:\n{proc.communicate()[0][-5000:]}')


def make_config(assets, **extra):
  config = demo_config.get_config()
  for k, v in {**overrides(assets), **extra}.items():
    *path, leaf = k.split('.')
    node = config
    for p in path:
      node = node[p]
    node[leaf] = v
  return config


def flags(assets, workdir, mode='train', **extra):
  # The CLI's persistent compilation cache, on as a user's job has it and shared by every
  # launch here. (On CPU JAX's keys differ per process, so only process 0 loads from it.)
  return [os.path.join(ROOT, 'main.py'), f'--mode={mode}',
          '--config=' + os.path.join(ROOT, 'configs', 'demo.py'), f'--workdir={workdir}',
          f"--compilation_cache_dir={assets / 'xla_cache'}",
          *(f'--config.{k}={v}' for k, v in {**overrides(assets), **extra}.items())]


def losses(workdir) -> dict[int, float]:
  """train/loss per step from the TensorBoard events (a rerun step keeps its last value)."""
  from tensorboard.backend.event_processing import event_accumulator
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*')),
                     key=os.path.getmtime):
    acc = event_accumulator.EventAccumulator(path, size_guidance={'tensors': 0})
    acc.Reload()
    for e in acc.Tensors('train/loss'):
      out[e.step] = float(np.frombuffer(e.tensor_proto.tensor_content, np.float32)[0]
                          if e.tensor_proto.tensor_content else e.tensor_proto.float_val[0])
  return out


def final_params(config, workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  setup = train.build(config, train.Schedule.from_config(config, data_steps_per_epoch=4))
  state, _ = ckpt.restore(setup.abstract_state, step=NUM_STEPS)
  ckpt.close()
  return jax.device_get({'params': state['params'], 'opt_state': state['opt_state']})


@pytest.fixture(scope='module')
def one_process(assets, tmp_path_factory):
  """The reference: this (pytest) process, 8 devices, uninterrupted."""
  workdir = str(tmp_path_factory.mktemp('one_process'))
  config = make_config(assets)
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope='module')
def two_processes(assets, tmp_path_factory):
  """2 x 4 devices: killed with SIGKILL (both) after the step-2 checkpoint, then resumed."""
  workdir = tmp_path_factory.mktemp('two_processes')
  proc = launch(*flags(assets, workdir))
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if (workdir / 'checkpoints' / '2').is_dir():
      break
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both trainers, at once
  log = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, log
  killed_at = checkpointing.Checkpointer(str(workdir / 'checkpoints')).latest_step()
  assert killed_at is not None and killed_at < NUM_STEPS, log

  proc = launch(*flags(assets, workdir))
  log = finish(proc)
  assert proc.returncode == 0, log
  assert '[p0]' in log and '[p1]' in log and 'process 1 of 2' in log
  assert f'resumed from step {killed_at}' in log, log
  return str(workdir), log


def test_losses_match_one_process_with_eight_devices(one_process, two_processes):
  _, ref_dir = one_process
  mp_dir, _ = two_processes
  ref, mp = losses(ref_dir), losses(mp_dir)
  assert sorted(ref) == sorted(mp) == list(range(1, NUM_STEPS + 1))
  diffs = {s: abs(ref[s] - mp[s]) for s in ref}
  print(f'2 processes vs 1: train/loss per step {mp}; |difference| {diffs}')
  assert max(diffs.values()) < 1e-5, diffs
  assert len(set(ref.values())) == NUM_STEPS  # the loss moves: the comparison means something


def test_params_after_kill_and_resume_match_one_process(one_process, two_processes):
  config, ref_dir = one_process
  mp_dir, _ = two_processes
  ref, mp = final_params(config, ref_dir), final_params(config, mp_dir)
  worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.abs(np.asarray(a, np.float64) - b).max()), mp, ref)))
  print(f'2 processes vs 1: largest |difference| of a param or optimizer-state entry: {worst:.3g}')
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                         mp, ref)


def test_sampling_on_two_processes_equals_one_device(assets, one_process, two_processes,
                                                     tmp_path):
  """4 chunks of 2 images, each process sampling 2 on 2 of its devices: the bytes of one device
  in this process."""
  config, _ = one_process
  mp_dir, _ = two_processes
  out_mp, out_one = tmp_path / 'mp', tmp_path / 'one'
  # 8 CPU devices per process, as this process has: XLA:CPU sizes its thread pool by the
  # process's device count and splits loops by it, so processes with 4 devices compile code
  # whose floats can differ from ours in the last bit (one uint8 value in 24576 had).
  proc = launch(*flags(assets, mp_dir, mode='sample',
                       **{'sample.output_dir': out_mp, 'sample.batch_size': 2}), cpu_devices=8)
  log = finish(proc)
  assert proc.returncode == 0, log
  assert 'samples 2 chunks (0 already written) on 2 devices' in log, log
  config.sample.output_dir, config.sample.batch_size = str(out_one), 2
  sample_mode.run(config, mp_dir, devices=jax.local_devices()[:1])
  with np.load(out_mp / 'samples.npz') as a, np.load(out_one / 'samples.npz') as b:
    assert a['arr_0'].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(a['arr_0'], b['arr_0'])
    np.testing.assert_array_equal(a['arr_1'], b['arr_1'])


def test_token_cache_and_folder_give_each_process_disjoint_examples(assets, tmp_path):
  rng = np.random.default_rng(0)
  for c in range(2):
    os.makedirs(tmp_path / 'folder' / 'train' / f'class{c}')
    for i in range(6):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
          tmp_path / 'folder' / 'train' / f'class{c}' / f'{i}.png')
  proc = launch(os.path.join(ROOT, 'tests', 'helpers', 'read_my_share.py'),
                str(assets / 'cache'), str(tmp_path / 'folder'), str(tmp_path), cpu_devices=1)
  log = finish(proc)
  assert proc.returncode == 0, log
  shares = [np.load(tmp_path / f'p{i}.npz') for i in range(2)]
  assert all(int(s['process_count']) == 2 for s in shares)
  for key, total in (('ids', 64), ('images', 12)):
    rows = [{r.tobytes() for r in s[key]} for s in shares]
    assert len(rows[0]) == len(rows[1]) == total // 2, key  # equal shares
    assert not rows[0] & rows[1], key  # disjoint
