"""Mesh, sharding rules, born-sharded init, multi-host start-up; sharded == single-device step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from mvar_jax import sharding, train
from mvar_jax import transformer as tfm
from mvar_jax import vqvae as vq
from mvar_jax.attention import AttentionConfig

from test_per_shard import pallas_operand_shapes

PATCH_NUMS = (1, 2, 3, 4)


def tiny_model_config():
  return tfm.TransformerConfig(depth=2, width=32, num_heads=2, vocab_size=16, cvae=4,
                               num_classes=10, patch_nums=PATCH_NUMS,
                               attention=AttentionConfig(refine_step=3, kernel_size=3))


def tiny_run_config(**mesh):
  c = common.get_config()
  m = c.model
  m.depth, m.width, m.num_heads, m.num_classes, m.vocab_size, m.cvae = 2, 32, 2, 10, 16, 4
  m.patch_nums, m.refine_step, m.kernel_size, m.dtype = PATCH_NUMS, 3, 3, 'float32'
  c.train.batch_size, c.train.num_steps, c.train.ratio_k = 8, 10, 2
  c.mesh.update(mesh)
  return c


# ----------------------------------------------------------------------------- mesh

def test_mesh_fills_the_rest():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2}, 8) == (4, 2)
  assert sharding.mesh_shape({'data': 2, 'fsdp': -1}, 8) == (2, 4)
  mesh = sharding.create_mesh({'data': 4, 'fsdp': 2})
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  assert sharding.create_mesh({'data': 1, 'fsdp': 1, 'num_devices': 1}).devices.size == 1


@pytest.mark.parametrize('mesh_config, message', [
    ({'data': 3, 'fsdp': 2}, r'mesh.data \* mesh.fsdp must equal the device count \(8\)'),
    ({'data': -1, 'fsdp': -1}, 'only one of mesh.data, mesh.fsdp may be -1'),
    ({'data': -1, 'fsdp': 3}, 'multiple of the fixed axes'),
    ({'data': 0, 'fsdp': 1}, 'mesh.data must be a positive size or -1'),
    ({'data': 8}, 'mesh.fsdp is missing'),
    ({'data': 1, 'fsdp': 1, 'num_devices': 9}, r'mesh.num_devices must be -1 \(all\) or in'),
])
def test_mesh_errors_name_the_field(mesh_config, message):
  with pytest.raises(ValueError, match=message):
    sharding.create_mesh(mesh_config)


def test_rules_are_validated():
  assert sharding.logical_rules({'rules': ()}) == sharding.DEFAULT_RULES
  with pytest.raises(ValueError, match="mesh axes are \\('data', 'fsdp'\\)"):
    sharding.logical_rules({'rules': (('embed', 'model'),)})


# ----------------------------------------------------------------------------- shardings

def test_weights_shard_embed_on_fsdp_and_batch_on_both_axes():
  mesh = sharding.create_mesh({'data': 4, 'fsdp': 2})
  boxed = jax.eval_shape(lambda: tfm.init_params(tiny_model_config(), jax.random.key(0)))
  specs = jax.tree_util.tree_map(lambda s: s.spec,
                                 sharding.logical_shardings(boxed, mesh))['params']
  assert specs['blocks_0']['attn']['mat_qkv']['kernel'] == P('fsdp', None)
  assert specs['blocks_0']['ffn']['fc2']['kernel'] == P(None, 'fsdp')
  assert specs['head']['kernel'] == P('fsdp', None)
  assert specs['blocks_0']['attn']['scale_mul_1H11'] == P(None, None, None, None)
  assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'))
  assert sharding.batch_divisor(mesh) == 8


def test_indivisible_dimension_is_replicated():
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 8})
  leaf = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((12, 4), jnp.float32), ('embed', 'mlp'))
  assert sharding.logical_shardings({'w': leaf}, mesh)['w'].spec == P()


def test_params_are_born_sharded():
  """jit(init, out_shardings) leaves every device with only its slice of each weight."""
  cfg = tiny_model_config()
  mesh = sharding.create_mesh({'data': 4, 'fsdp': 2})
  boxed = jax.eval_shape(lambda: tfm.init_params(cfg, jax.random.key(0)))['params']
  shardings = sharding.logical_shardings(boxed, mesh)
  params = jax.jit(lambda k: nn.unbox(tfm.init_params(cfg, k)['params']),
                   out_shardings=shardings)(jax.random.key(0))
  qkv = params['blocks_0']['attn']['mat_qkv']['kernel']
  assert qkv.sharding.spec == P('fsdp', None)
  assert {s.data.shape for s in qkv.addressable_shards} == {(16, 96)}
  # Same values as an unsharded init: the layout never changes the numbers.
  ref = jax.jit(lambda k: nn.unbox(tfm.init_params(cfg, k)['params']))(jax.random.key(0))
  np.testing.assert_array_equal(qkv, ref['blocks_0']['attn']['mat_qkv']['kernel'])


# ----------------------------------------------------------------------------- sharded step

def _run_two_steps(config, mesh, jaxprs=None, run=True):
  """(losses, params, state) after two steps; `jaxprs` collects the step's jaxpr, and
  run=False stops once it is traced."""
  schedule = train.Schedule(total_steps=10, warmup_steps=2, steps_per_epoch=5, peak_lr=1e-3)
  setup = train.build(config, schedule, mesh)
  state = train.init_state(setup, jax.random.key(0))
  vcfg = vq.VQVAEConfig(ch=16, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4,
                        vocab_size=16, patch_nums=PATCH_NUMS, norm_groups=8, using_sa=False,
                        using_mid_sa=False)
  vparams = vq.random_params(vcfg, seed=1)  # nothing compiled (VQVAE.init: ~8 s per call)
  tok_params = jax.device_put({'quantize': vparams['quantize']}, setup.replicated)
  tok_sh = jax.tree_util.tree_map(lambda _: setup.replicated, tok_params)
  rng = np.random.default_rng(0)
  losses = []
  # All scales in one call: the dense block-diagonal part and the neighbourhood part, one compile.
  fn = train.compile_train_step(setup, vq.Tokenizer(vcfg), tok_sh, first=0, last=3,
                                label_smoothing=0.1, ema_decay=0.0)
  for step in range(2):
    local = {'ids': rng.integers(0, 16, (8, 30)).astype(np.int32),
             'label': rng.integers(0, 10, (8,)).astype(np.int32)}
    batch = sharding.to_global_batch(local, setup.batch_sharding)
    if jaxprs is not None and step == 0:
      jaxprs.append(fn.trace(state, batch, jax.random.key(2), tok_params).jaxpr)
    if not run:
      return None
    state, metrics = fn(state, batch, jax.random.fold_in(jax.random.key(2), step), tok_params)
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state['params']), state


def sharded_step_config(implementation='auto'):
  config = tiny_run_config(data=4, fsdp=2)
  config.model.drop_path_rate = 0.1  # exercise the dropout key under sharding
  config.model.attention_implementation = implementation
  return config


@pytest.fixture(scope='module')
def one_device_run():
  """(losses, params) of two steps on one device: the reference of the sharded steps."""
  losses, params, _ = _run_two_steps(
      sharded_step_config(), sharding.create_mesh({'data': 1, 'fsdp': 1, 'num_devices': 1}))
  return losses, params


def _assert_same_run(run, reference):
  np.testing.assert_allclose(run[0], reference[0], rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         run[1], reference[1])


def test_sharded_step_matches_single_device(one_device_run):
  """Same losses and parameters on a (data=4, fsdp=2) mesh as on one device (dropout included)."""
  config = sharded_step_config()
  losses_n, params_n, state_n = _run_two_steps(config, sharding.create_mesh(config.mesh))
  _assert_same_run((losses_n, params_n), one_device_run)
  # The state stays sharded through the donated step.
  qkv = state_n['params']['blocks_0']['attn']['mat_qkv']['kernel']
  assert qkv.sharding.spec == P('fsdp', None)


def test_sharded_step_runs_the_pallas_kernel_per_device(monkeypatch):
  """With the Pallas neighbourhood kernel the (data=4, fsdp=2) step calls it on each device's
  1 of the 8 rows, forward and backward (traced, not run: test_per_shard.py checks the
  kernel's values and gradients under a mesh)."""
  monkeypatch.setenv('MVAR_PALLAS_INTERPRET', '1')
  config = sharded_step_config('pallas')
  jaxprs = []
  _run_two_steps(config, sharding.create_mesh(config.mesh), jaxprs, run=False)
  calls = pallas_operand_shapes(jaxprs[0])
  assert len(calls) == 3 * config.model.depth  # forward, dQ, dK/dV of the one NA scale per block
  assert {shape[0] for call in calls for shape in call} == {1}


# ----------------------------------------------------------------------------- multi-host

_CLUSTER_VARS = ('COORDINATOR_ADDRESS', 'NUM_PROCESSES', 'PROCESS_ID', 'SLURM_NTASKS',
                 'SLURM_NPROCS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
                 'MEGASCALE_COORDINATOR_ADDRESS')


def test_initialize_distributed_is_a_noop_on_one_process(monkeypatch):
  for var in _CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  assert sharding.initialize_distributed() == 'single'
  monkeypatch.setenv('SLURM_JOB_ID', '1')
  monkeypatch.setenv('SLURM_NTASKS', '1')  # one task: nothing to coordinate
  assert sharding.initialize_distributed() == 'single'
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'localhost')  # a single-host TPU VM
  assert sharding.initialize_distributed() == 'single'


def test_env_var_cluster_needs_all_variables(monkeypatch):
  for var in _CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('NUM_PROCESSES', '2')
  with pytest.raises(ValueError, match=r"\['PROCESS_ID'\] must be set too"):
    sharding.initialize_distributed()
