"""GroupNorm's single-pass sums as one Pallas kernel (`kernels.pixel_sums`), interpreted on CPU.

The kernel must give XLA's per-(image, channel) sums at the decoder's widths, its gradient,
a clear error (or XLA, inside GroupNorm) for maps it cannot take, one kernel per batch shard
under a mesh, and a CUDA lowering at the sampler's shapes.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mvar_jax import sharding, vqvae
from mvar_jax.kernels import pixel_sums as ps

from cuda_lowering import compile_for_sm90, export_for_cuda, triton_calls
from test_per_shard import mesh_2x4, pallas_operand_shapes

pallas_sums = functools.partial(ps.pixel_sums_pallas, interpret=True)


def _map(shape, dtype=jnp.bfloat16, seed=0):
  return (jax.random.normal(jax.random.key(seed), shape) * 2 + 0.5).astype(dtype)


def _xla_sums(x):
  x32 = x.astype(jnp.float32)
  return x32.sum(axis=(1, 2)), jnp.square(x32).sum(axis=(1, 2))


@pytest.mark.parametrize('shape', [(2, 16, 16, 160), (1, 32, 32, 320), (3, 16, 16, 640),
                                   (2, 64, 64, 160)])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_sums_are_xlas_at_the_decoders_widths(shape, dtype):
  x = _map(shape, dtype)
  total, squares = pallas_sums(x)
  want_total, want_squares = _xla_sums(x)
  assert total.shape == squares.shape == shape[::3] and total.dtype == jnp.float32
  np.testing.assert_allclose(total, want_total, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(squares, want_squares, rtol=1e-5)


def test_every_map_of_the_256px_decoder_fits_the_kernel():
  """Each map GroupNorm normalises in the bf16 decode of 8 (chunks) or 32 (whole-batch
  stages) images: the kernel takes all of them, so none falls back to XLA."""
  shapes = [(32, 16, 16, 640), (32, 32, 32, 640), (32, 32, 32, 320), (32, 64, 64, 320),
            (8, 128, 128, 320), (8, 128, 128, 160), (8, 256, 256, 160)]
  for shape in shapes:
    assert ps.period(shape[-1]) == 5 and ps.block_rows(shape) >= ps.STEP, shape
  assert ps.block_rows((8, 256, 256, 160)) == ps.MAX_BLOCK_ROWS


def test_a_map_it_cannot_take_is_named_and_groupnorm_uses_xla_for_it(monkeypatch):
  x = _map((2, 6, 5, 32))  # 960 values per image: not whole rows of 1024
  assert ps.block_rows(x.shape) == 0
  with pytest.raises(ValueError, match=r'shape \(2, 6, 5, 32\) is not whole rows'):
    pallas_sums(x)
  monkeypatch.setenv('MVAR_PALLAS_INTERPRET', '1')
  for got, want in zip(vqvae.pixel_sums(x, 16, 'pallas'), _xla_sums(x)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
  with pytest.raises(ValueError, match='GroupNorm sums must be one of'):
    vqvae.pixel_sums(x, 16, 'triton')


def test_gradient_is_the_sums_gradient():
  x = _map((2, 16, 16, 160), jnp.float32)
  w_total, w_squares = jax.random.normal(jax.random.key(1), (2, 2, 160))
  loss = lambda sums: lambda x: jnp.sum(sums(x)[0] * w_total + jnp.sin(sums(x)[1] * 1e-3))
  np.testing.assert_allclose(jax.grad(loss(pallas_sums))(x), jax.grad(loss(_xla_sums))(x),
                             rtol=1e-4, atol=1e-5)


def test_groupnorm_with_the_kernel_is_groupnorm_with_xla(monkeypatch):
  monkeypatch.setenv('MVAR_PALLAS_INTERPRET', '1')
  x = _map((2, 16, 16, 160))
  norm = lambda sums: vqvae.GroupNorm(32, 1e-6, jnp.bfloat16, single_pass=True, sums=sums)
  params = nn.unbox(norm('xla').init(jax.random.key(0), x))
  ours, theirs = norm('pallas').apply(params, x), norm('xla').apply(params, x)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_allclose(ours.astype(jnp.float32), theirs.astype(jnp.float32), atol=0.02)
  assert pallas_operand_shapes(jax.make_jaxpr(lambda x: norm('pallas').apply(params, x))(x))
  assert not pallas_operand_shapes(jax.make_jaxpr(lambda x: norm('xla').apply(params, x))(x))


def test_runs_once_per_batch_shard_under_a_mesh():
  mesh = mesh_2x4()
  x = _map((16, 16, 16, 160))
  fn = jax.jit(sharding.traced_on_mesh(pallas_sums, mesh))
  args = (jax.device_put(x, NamedSharding(mesh, P(('data', 'fsdp')))),)
  assert [call[0][0] for call in pallas_operand_shapes(fn.trace(*args).jaxpr)] == [2]
  for got, want in zip(fn(*args), _xla_sums(x)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize('shape', [(8, 256, 256, 160), (32, 16, 16, 640)])
def test_lowers_for_cuda_at_the_samplers_shapes(shape):
  fn = functools.partial(ps.pixel_sums_pallas, interpret=False)
  text = export_for_cuda(fn, jax.ShapeDtypeStruct(shape, jnp.bfloat16))
  assert len(triton_calls(text)) == 1 and 'pixel_sums' in text


@pytest.mark.parametrize('shape', [(8, 256, 256, 160), (32, 16, 16, 640)])
def test_triton_compiles_the_kernel_for_sm90(tmp_path, shape):
  fn = functools.partial(ps.pixel_sums_pallas, interpret=False)
  kernels = compile_for_sm90(fn, jax.ShapeDtypeStruct(shape, jnp.bfloat16), workdir=tmp_path)
  assert list(kernels) == ['pixel_sums']
