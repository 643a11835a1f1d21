"""Kernels under a mesh run once per device on its rows of the batch (`kernels.per_shard`).

XLA cannot split a Pallas custom call: without shard_map it would gather a batch-sharded
operand onto every device and run the whole batch there. Each test reads the operand shapes
the kernels are called with (in the jaxpr, and in the CUDA lowering), so a kernel that sees
the global batch fails here. The kernels run in Pallas' interpreter on CPU.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mvar_jax import sharding
from mvar_jax.kernels import dense_gelu, per_shard, select_threshold
from mvar_jax.kernels.neighborhood_attention import pallas_kernel, reference

from cuda_lowering import abstract_gpu_mesh, export_for_cuda, triton_calls

H = W = 8
KERNEL = 5


def operand_shapes(closed_jaxpr, primitive: str) -> list[list[tuple]]:
  """Operand shapes of every `primitive` equation in a jaxpr, nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == primitive:
        found.append([tuple(v.aval.shape) for v in eqn.invars])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, 'jaxpr') and hasattr(sub, 'consts'):  # ClosedJaxpr
            walk(sub.jaxpr)
          elif hasattr(sub, 'eqns'):  # Jaxpr
            walk(sub)
  walk(closed_jaxpr.jaxpr)
  return found


def pallas_operand_shapes(closed_jaxpr) -> list[list[tuple]]:
  """Operand shapes of every pallas_call in a jaxpr, nested jaxprs included."""
  return operand_shapes(closed_jaxpr, 'pallas_call')


def mesh_2x4():
  return sharding.create_mesh({'data': 2, 'fsdp': 4})


def test_batch_axes_take_the_axes_that_divide_the_batch():
  mesh = mesh_2x4()
  assert per_shard.batch_axes(mesh.abstract_mesh, 16) == ('data', 'fsdp')
  assert per_shard.batch_axes(mesh.abstract_mesh, 8) == ('data', 'fsdp')
  assert per_shard.batch_axes(mesh.abstract_mesh, 6) == ('data',)  # 2 divides 6, 8 does not
  assert per_shard.batch_axes(mesh.abstract_mesh, 3) == ()
  one = sharding.create_mesh({'data': 1, 'fsdp': 8})
  assert per_shard.batch_axes(one.abstract_mesh, 8) == ('fsdp',)  # size-1 axes are skipped
  assert per_shard.batch_axes(jax.sharding.get_abstract_mesh(), 8) == ()  # no ambient mesh


def test_batch_axes_follow_the_logical_rules_in_context():
  mesh = mesh_2x4().abstract_mesh
  with nn.logical_axis_rules((('activation_batch', 'fsdp'), ('embed', 'data'))):
    assert per_shard.batch_axes(mesh, 16) == ('fsdp',)
  with nn.logical_axis_rules((('activation_batch', ('fsdp', 'data')),)):
    assert per_shard.batch_axes(mesh, 16) == ('fsdp', 'data')
  with nn.logical_axis_rules((('activation_batch', None),)):
    assert per_shard.batch_axes(mesh, 16) == ()  # the batch is not split: nor is the kernel


def _qkv(batch, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (batch, H * W, 2, 32), jnp.float32) for k in keys]


def _loss(attend):
  return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))


@pytest.mark.parametrize('batch, rows_per_call', [(16, 2), (6, 3)])
def test_neighborhood_kernel_runs_per_batch_shard_forward_and_backward(batch, rows_per_call):
  mesh = mesh_2x4()
  attend = functools.partial(pallas_kernel.na2d_pallas, height=H, width=W, kernel_size=KERNEL,
                             interpret=True)
  step = jax.jit(sharding.traced_on_mesh(jax.value_and_grad(_loss(attend), argnums=(0, 1, 2)),
                                         mesh))
  q, k, v = _qkv(batch)
  sharded = NamedSharding(mesh, P(per_shard.batch_axes(mesh.abstract_mesh, batch)))
  args = [jax.device_put(x, sharded) for x in (q, k, v)]

  shapes = pallas_operand_shapes(step.trace(*args).jaxpr)
  assert len(shapes) == 3  # forward, dQ, dK/dV
  assert {s[0] for call in shapes for s in call} == {rows_per_call}

  value, grads = step(*args)
  ref = functools.partial(reference.na2d_gather, height=H, width=W, kernel_size=KERNEL)
  ref_value, ref_grads = jax.value_and_grad(_loss(ref), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, rg in zip(grads, ref_grads):
    np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-5)
    assert g.sharding.is_equivalent_to(sharded, g.ndim)


def test_without_a_mesh_the_kernel_sees_the_whole_batch():
  attend = functools.partial(pallas_kernel.na2d_pallas, height=H, width=W, kernel_size=KERNEL,
                             interpret=True)
  shapes = pallas_operand_shapes(jax.make_jaxpr(attend)(*_qkv(16)))
  assert [call[0][0] for call in shapes] == [16]


def test_selection_kernel_runs_per_row_shard():
  mesh = mesh_2x4()
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(32, 200)).astype(np.float32) * 3
  top_p = rng.uniform(0.5, 1.0, size=(32,)).astype(np.float32)
  select = lambda x, p: select_threshold.kept_threshold_pallas(x, top_k=20, top_p=p,
                                                               interpret=True)
  fn = jax.jit(sharding.traced_on_mesh(select, mesh))
  sharded = NamedSharding(mesh, P(('data', 'fsdp')))
  args = (jax.device_put(logits, sharded), jax.device_put(top_p, sharded))
  assert [call[0][0] for call in pallas_operand_shapes(fn.trace(*args).jaxpr)] == [4]
  np.testing.assert_array_equal(fn(*args), select(logits, top_p))


def test_fused_qkv_kernel_runs_per_batch_shard_with_its_shared_operands_whole():
  """The (B, N, 3, H, D) projection is split over the batch; the head scales and the bias
  (no batch axis) reach every device whole."""
  mesh = mesh_2x4()
  rng = np.random.default_rng(1)
  qkv = rng.normal(size=(16, H * W, 3, 2, 16)).astype(np.float32)
  head_scale = np.exp(rng.normal(size=(2,))).astype(np.float32)
  bias = rng.normal(size=(3, 2, 16)).astype(np.float32)
  attend = lambda x, s, b: pallas_kernel.na2d_pallas_from_qkv(
      x, s, height=H, width=W, kernel_size=KERNEL, bias_3HD=b, interpret=True)
  fn = jax.jit(sharding.traced_on_mesh(attend, mesh))
  args = (jax.device_put(qkv, NamedSharding(mesh, P(('data', 'fsdp')))), head_scale, bias)
  shapes = pallas_operand_shapes(fn.trace(*args).jaxpr)
  assert len(shapes) == 1 and shapes[0][0] == (2, H * W, 3, 2, 16)  # 16 maps over 8 devices
  assert (3, 2, 16) in shapes[0]  # the whole bias on each
  np.testing.assert_allclose(fn(*args), attend(qkv, head_scale, bias), rtol=1e-5, atol=1e-5)


def test_dense_gelu_kernel_runs_per_row_shard_with_the_weights_whole():
  mesh = mesh_2x4()
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8 * 32, 64)).astype(np.float32)
  w = (rng.normal(size=(64, 128)) / 8).astype(np.float32)
  b = rng.normal(size=(128,)).astype(np.float32)
  tiles = dense_gelu.Tiles(block_m=16, block_n=64, block_k=32)
  fc1 = lambda x, w, b: dense_gelu.dense_gelu_pallas(x, w, b, tiles=tiles, interpret=True)
  fn = jax.jit(sharding.traced_on_mesh(fc1, mesh))
  args = (jax.device_put(x, NamedSharding(mesh, P(('data', 'fsdp')))), w, b)
  shapes = pallas_operand_shapes(fn.trace(*args).jaxpr)
  assert [call[0] for call in shapes] == [(32, 64)]  # 256 rows over 8 devices
  assert (64, 128) in shapes[0]  # the whole weight on each
  np.testing.assert_allclose(fn(*args), fc1(x, w, b), rtol=1e-5, atol=1e-5)


def test_cuda_lowering_calls_the_triton_kernels_on_per_device_rows():
  shape = jax.ShapeDtypeStruct((16, 256, 4, 64), jnp.bfloat16)
  attend = functools.partial(pallas_kernel.na2d_pallas, height=16, width=16, kernel_size=7,
                             interpret=False)
  fn = lambda q, k, v: jax.vjp(attend, q, k, v)[1](q)
  mesh = abstract_gpu_mesh((2, 4), ('data', 'fsdp'))
  if mesh is None:
    pytest.skip('this jax has no abstract devices (needed to lower for CUDA under a mesh)')
  calls = triton_calls(export_for_cuda(fn, shape, shape, shape, mesh=mesh))
  assert len(calls) == 3  # forward, dQ, dK/dV
  for line in calls:
    assert 'tensor<2x256x4x64xbf16>' in line and 'tensor<16x256' not in line, line
