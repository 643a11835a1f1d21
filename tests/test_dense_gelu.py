"""The FFN's fc1 + GELU in one Pallas kernel: XLA's values, and the model's logits unchanged.

The kernel runs in Pallas' interpreter here; its CUDA lowering is checked with jax.export.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax import transformer as tfm
from mvar_jax.kernels import dense_gelu

from cuda_lowering import compile_for_sm90, export_for_cuda, triton_calls
from test_transformer import labels, logits, random_params, teacher_input, tiny_config

SMALL_TILES = dense_gelu.Tiles(block_m=32, block_n=64, block_k=32)


def _operands(m, k, n, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (m, k), jnp.float32)
  w = jax.random.normal(ks[1], (k, n), jnp.float32) / np.sqrt(k)
  b = jax.random.normal(ks[2], (n,), jnp.float32)
  return x.astype(dtype), w, b


def _xla(x, w, b):
  h = jnp.dot(x.astype(jnp.float32), w, precision='highest') + b
  return jax.nn.gelu(h, approximate=True)


def test_gelu_tanh_is_jax_gelu_approximate():
  h = jnp.linspace(-12.0, 12.0, 20001, dtype=jnp.float32)
  np.testing.assert_allclose(dense_gelu.gelu_tanh(h), jax.nn.gelu(h, approximate=True),
                             rtol=2e-6, atol=2e-6)
  assert np.all(np.isfinite(dense_gelu.gelu_tanh(jnp.array([-1e4, 1e4], jnp.float32))))


@pytest.mark.parametrize('m', [100, 128, 7])  # 100 and 7 rows: padded to the row tile
def test_fp32_kernel_equals_xla(m):
  x, w, b = _operands(m, 64, 128, jnp.float32, seed=m)
  out = dense_gelu.dense_gelu_pallas(x, w, b, tiles=SMALL_TILES, interpret=True)
  assert out.shape == (m, 128) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _xla(x, w, b), rtol=1e-5, atol=1e-5)


def test_bf16_kernel_is_within_one_rounding_of_xla():
  x, w, b = _operands(96, 64, 128, jnp.bfloat16, seed=3)
  out = dense_gelu.dense_gelu_pallas(x, w, b, tiles=SMALL_TILES, interpret=True)
  assert out.dtype == jnp.bfloat16
  # Reference on the same bf16-rounded operands, in fp32: only the output's rounding differs.
  ref = _xla(x, w.astype(jnp.bfloat16).astype(jnp.float32), b.astype(jnp.bfloat16).astype(
      jnp.float32))
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)


def test_shapes_the_tiles_do_not_divide_are_refused():
  x, w, b = _operands(16, 48, 128, jnp.float32)
  with pytest.raises(ValueError, match='multiples'):
    dense_gelu.dense_gelu_pallas(x, w, b, tiles=SMALL_TILES, interpret=True)
  with pytest.raises(ValueError, match='do not chain'):
    dense_gelu.dense_gelu_pallas(x, w[:32], b, tiles=SMALL_TILES, interpret=True)
  with pytest.raises(ValueError, match='power of two'):
    dense_gelu.dense_gelu_pallas(x, w, b, tiles=dense_gelu.Tiles(block_n=96), interpret=True)


def test_model_with_the_fused_ffn_gives_the_same_logits(monkeypatch):
  monkeypatch.setenv('MVAR_PALLAS_INTERPRET', '1')
  config = tiny_config(width=64, num_heads=4)  # hidden 256: the default tiles divide it
  fused = tiny_config(width=64, num_heads=4, ffn_implementation='pallas')
  params = random_params(config, seed=41)
  label_B, x = labels(config, 42, 2), teacher_input(config, 43, 2, 0, 4)
  np.testing.assert_allclose(logits(fused, params, label_B, x), logits(config, params, label_B, x),
                             rtol=2e-5, atol=2e-5)
  jaxpr = str(jax.make_jaxpr(lambda p: tfm.MVARTransformer(fused).apply(
      {'params': p}, label_B, x))(params))
  assert jaxpr.count('name=dense_gelu') == config.depth  # one kernel per block


def test_auto_and_training_use_xla():
  resolve = tfm.resolve_ffn_implementation
  assert resolve('auto', deterministic=True) == 'xla'  # measured slower on an H100
  assert resolve('auto', deterministic=False) == 'xla'
  assert resolve('pallas', deterministic=True) == 'pallas'
  with pytest.raises(ValueError, match='inference only'):
    resolve('pallas', deterministic=False)
  mesh = jax.sharding.AbstractMesh((1,), ('data',))
  with jax.sharding.use_abstract_mesh(mesh):  # per device on its rows: tests/test_per_shard.py
    assert resolve('pallas', deterministic=True) == 'pallas'
  with pytest.raises(ValueError, match='ffn_implementation'):
    tiny_config(ffn_implementation='triton')


def test_lowers_for_cuda_at_the_sampler_shapes():
  # The last scale of d16 at batch 32 with CFG: 64 x 256 tokens, C 1024 -> 4096, bf16.
  x = jax.ShapeDtypeStruct((64 * 256, 1024), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
  fn = lambda x, w, b: dense_gelu.dense_gelu_pallas(x, w, b, interpret=False)
  text = export_for_cuda(fn, x, w, b)
  assert len(triton_calls(text)) == 1
  assert 'dense_gelu' in text


def test_triton_compiles_for_sm90_at_the_sampler_shapes(tmp_path):
  x = jax.ShapeDtypeStruct((64 * 256, 1024), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
  fn = lambda x, w, b: dense_gelu.dense_gelu_pallas(x, w, b, interpret=False)
  (name, kernel), = compile_for_sm90(fn, x, w, b, workdir=tmp_path).items()
  assert name.startswith('dense_gelu') and 'wgmma' in kernel.ptx


def test_row_tiles_shrink_to_divide_the_rows_instead_of_padding():
  tiles = dense_gelu.Tiles(block_m=128)
  assert tiles.fit(64 * 256).block_m == 128  # the last scale
  assert tiles.fit(64 * 169).block_m == 64  # 13x13: 10816 rows, 64 divides them
  assert tiles.fit(64).block_m == 64  # the first scale: one token per sequence
  assert tiles.fit(7).block_m == 16  # padded to 16
