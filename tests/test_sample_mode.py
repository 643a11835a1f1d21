"""Sample mode: every device, the same images on any topology, shards that survive kill -9."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from mvar_jax import compilation_cache, convert, sample_mode
from mvar_jax import transformer as tfm
from mvar_jax import vqvae as vq
from mvar_jax.attention import AttentionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH_NUMS = (1, 2, 4)
VOCAB, CLASSES = 32, 5


def _random_like(shapes, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """A converted tiny tokenizer (4x4 codes -> 8x8 px) and transformer with random weights."""
  root = tmp_path_factory.mktemp('weights')
  vcfg = vq.VQVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, z_channels=4, vocab_size=VOCAB,
                        patch_nums=PATCH_NUMS, norm_groups=4, using_sa=False, using_mid_sa=False)
  vshapes = jax.eval_shape(lambda: nn.unbox(vq.init_params(vcfg, jax.random.key(0))['params']))
  convert.save_converted(str(root), 'vqvae', vcfg, _random_like(vshapes, 0))
  tcfg = tfm.TransformerConfig(depth=1, width=32, num_heads=2, num_classes=CLASSES,
                               vocab_size=VOCAB, cvae=4, patch_nums=PATCH_NUMS,
                               attention=AttentionConfig(mode='mvar', refine_step=2,
                                                         kernel_size=3))
  tshapes = jax.eval_shape(lambda: nn.unbox(tfm.init_params(tcfg, jax.random.key(0))['params']))
  convert.save_converted(str(root), 'transformer', tcfg, _random_like(tshapes, 1, scale=1.0))
  return str(root)


def sample_config(weights, out_dir, *, num_images=22, batch_size=4):
  c = common.get_config()
  c.seed = 3
  c.tokenizer.checkpoint = c.sample.checkpoint = weights
  s = c.sample
  s.output_dir, s.num_images, s.batch_size = str(out_dir), num_images, batch_size
  s.cfg, s.top_k, s.top_p = 2.0, 8, 0.9
  return c


@pytest.fixture(scope='module')
def on_three_devices(weights, tmp_path_factory):
  """22 images (6 chunks of 4, the last one short) on 3 of the simulated devices, 2 chunks each
  (two calls of one 3-device program)."""
  out = tmp_path_factory.mktemp('three')
  path = sample_mode.run(sample_config(weights, out), str(out), devices=jax.local_devices()[:3])
  with np.load(path) as z:
    return {k: z[k] for k in z.files}, out


def test_writes_the_adm_npz_with_balanced_labels(on_three_devices):
  npz, out = on_three_devices
  assert set(npz) == {'arr_0', 'arr_1'}
  assert npz['arr_0'].shape == (22, 8, 8, 3) and npz['arr_0'].dtype == np.uint8
  np.testing.assert_array_equal(npz['arr_1'], np.arange(22) % CLASSES)
  assert npz['arr_0'].std() > 10  # real, varied images, not a blank canvas
  assert len(os.listdir(out / 'shards')) == 6  # ceil(22 / 4) chunks
  assert (out / 'samples.png').exists()


def test_one_device_gives_the_same_images_as_three(weights, on_three_devices, tmp_path):
  npz, _ = on_three_devices
  path = sample_mode.run(sample_config(weights, tmp_path), str(tmp_path),
                         devices=jax.local_devices()[:1])
  with np.load(path) as z:
    np.testing.assert_array_equal(z['arr_0'], npz['arr_0'])
    np.testing.assert_array_equal(z['arr_1'], npz['arr_1'])


def test_another_seed_gives_other_images_and_refuses_to_mix(weights, on_three_devices):
  npz, out = on_three_devices
  config = sample_config(weights, out)
  config.seed = 4
  with pytest.raises(ValueError, match='written by another sampling run'):
    sample_mode.run(config, str(out))


def test_bf16_params_sample_under_their_own_fingerprint(weights, on_three_devices, tmp_path,
                                                       monkeypatch):
  """sample.param_dtype='bfloat16': the sampler gets a bf16 copy of the transformer params, and
  its shards carry another fingerprint, which an fp32 run's directory refuses."""
  npz, out = on_three_devices
  config = sample_config(weights, out)
  config.sample.param_dtype = 'bfloat16'
  with pytest.raises(ValueError, match='written by another sampling run'):
    sample_mode.run(config, str(out))
  from mvar_jax import sampling
  seen, compile_chunk_sampler = [], sampling.compile_chunk_sampler

  def spy(model, params, *args, **kwargs):
    seen.append({str(x.dtype) for x in jax.tree_util.tree_leaves(params)})
    return compile_chunk_sampler(model, params, *args, **kwargs)

  monkeypatch.setattr(sampling, 'compile_chunk_sampler', spy)
  config = sample_config(weights, tmp_path, num_images=8)
  config.sample.param_dtype = 'bfloat16'
  with np.load(sample_mode.run(config, str(tmp_path), devices=jax.local_devices()[:1])) as z:
    assert seen == [{'bfloat16'}]
    assert z['arr_0'].shape == (8, 8, 8, 3) and z['arr_0'].std() > 10
    np.testing.assert_array_equal(z['arr_1'], np.arange(8) % CLASSES)
    # The fp32 run's first two chunks (same labels, same keys): the model computes in bf16
    # either way, so only the fp32 embeddings and head see the rounding; at this size the
    # images come out the same, in general nearly so.
    assert np.mean(np.abs(z['arr_0'].astype(int) - npz['arr_0'][:8]) <= 8) > 0.5


def _tiny_model_config(c):
  """`config.model` set to the tiny transformer of `weights` (a training run's architecture)."""
  m = c.model
  m.depth, m.width, m.num_heads, m.num_classes, m.vocab_size, m.cvae = 1, 32, 2, CLASSES, VOCAB, 4
  m.patch_nums, m.attention_mode, m.refine_step, m.kernel_size = PATCH_NUMS, 'mvar', 2, 3
  return c


@pytest.mark.parametrize('param_dtype', ['', 'bfloat16'])
def test_params_of_a_training_checkpoint_are_restored_in_sample_param_dtype(weights, tmp_path,
                                                                            param_dtype):
  """Without sample.checkpoint the newest Orbax checkpoint of the workdir is sampled from (its
  EMA params): with sample.param_dtype set they are read straight into that dtype, the same
  numbers as casting the stored ones (sampling.inference_params), on this process's device."""
  from mvar_jax import checkpointing, config_utils, sampling
  config = _tiny_model_config(sample_config(weights, tmp_path))
  config.sample.checkpoint, config.sample.use_ema = '', True
  config.sample.param_dtype = param_dtype
  shapes = jax.eval_shape(lambda: nn.unbox(tfm.init_params(
      config_utils.transformer_config_from(config), jax.random.key(0))['params']))
  params, ema = _random_like(shapes, 7), _random_like(shapes, 8)
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(5, {'params': params, 'ema_params': ema, 'step': np.int32(5)})
  ckpt.close()

  model, restored, source = sample_mode.load_params(config, str(tmp_path))
  assert source.endswith('@5:ema_params') and model.config.width == 32
  want = sampling.inference_params(ema, param_dtype) if param_dtype else ema
  def same(path, got, w):
    assert got.dtype == np.dtype(param_dtype or 'float32'), path
    assert got.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w), err_msg=str(path))

  jax.tree_util.tree_map_with_path(same, restored, want)


def _main_sample(weights, out_dir, *extra, wrap=(), cache_dir='none', extra_env=None):
  cmd = [*wrap, sys.executable, os.path.join(ROOT, 'main.py'), '--mode=sample',
         '--config=' + os.path.join(ROOT, 'configs', 'demo.py'), f'--workdir={out_dir}',
         f'--config.tokenizer.checkpoint={weights}', f'--config.sample.checkpoint={weights}',
         f'--config.sample.output_dir={out_dir}', '--config.seed=3', '--config.sample.cfg=2.0',
         '--config.sample.top_k=8', '--config.sample.top_p=0.9',
         f'--compilation_cache_dir={cache_dir}', *extra]
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1', PYTHONPATH=ROOT,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', **(extra_env or {}))
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=ROOT)


def test_kill_9_mid_sampling_then_resume_gives_the_same_npz(weights, tmp_path):
  """A run killed with SIGKILL after its first shards resumes from them; the npz is the same."""
  extra = ('--config.sample.num_images=240', '--config.sample.batch_size=4')
  cache = tmp_path / 'xla_cache'  # main.py's own flag: the rerun loads the first run's sampler
  proc = _main_sample(weights, tmp_path, *extra, cache_dir=cache)
  shards = tmp_path / 'shards'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if len(list(shards.glob('chunk_*.npz'))) >= 4:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  log = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, log  # killed mid-run, not finished
  assert not (tmp_path / 'samples.npz').exists()
  survived = {p.name: p.stat().st_mtime_ns for p in shards.glob('chunk_*.npz')}
  assert 4 <= len(survived) < 60
  assert len(os.listdir(cache / compilation_cache.EXECUTABLES_SUBDIR)) == 1  # the sampler

  # The rerun also lists its imports: sampling never starts TensorFlow (3 s, and it must
  # never claim a GPU), so main.py does not import it to hide the GPUs from it.
  proc = _main_sample(weights, tmp_path, *extra, cache_dir=cache,
                      extra_env={'PYTHONPROFILEIMPORTTIME': '1'})
  log = proc.communicate()[0]
  assert proc.returncode == 0, log
  assert f'({len(survived)} already written)' in log
  assert 'compilation_cache: loaded' in log, log  # not traced, not compiled again
  imports = [line.rsplit('|', 1)[-1].strip() for line in log.splitlines()
             if line.startswith('import time:')]
  assert 'jax' in imports and 'tensorflow' not in imports
  for name, mtime in survived.items():  # skipped, not sampled again
    assert (shards / name).stat().st_mtime_ns == mtime

  # Uninterrupted, in this process (its executable for 4 images is already compiled).
  config = sample_config(weights, tmp_path / 'whole', num_images=240, batch_size=4)
  whole = sample_mode.run(config, str(tmp_path / 'whole'), devices=jax.local_devices()[:1])
  with np.load(tmp_path / 'samples.npz') as resumed, np.load(whole) as full:
    np.testing.assert_array_equal(resumed['arr_0'], full['arr_0'])
    np.testing.assert_array_equal(resumed['arr_1'], full['arr_1'])


def test_read_only_output_dir_fails_before_sampling():
  """The directory is checked first: the (missing) weights are never even opened."""
  parent = pathlib.Path(tempfile.mkdtemp())
  ro = parent / 'read_only'
  ro.mkdir()
  ro.chmod(0o555)
  # root ignores permission bits: there the directory is a read-only bind mount instead.
  wrap = (['unshare', '-m', '--propagation', 'private', 'sh', '-c',
           f'mount --bind -o ro {ro} {ro} && exec "$@"', 'sh'] if os.geteuid() == 0 else [])
  proc = _main_sample('/nonexistent/weights', ro, '--config.sample.num_images=4',
                      '--config.sample.batch_size=2', wrap=wrap)
  log = proc.communicate(timeout=300)[0]
  assert proc.returncode != 0
  assert 'is not writable' in log and str(ro) in log, log
  assert '/nonexistent/weights' not in log.split('is not writable')[0].splitlines()[-1]
  assert os.listdir(ro) == []
  shutil.rmtree(parent)
