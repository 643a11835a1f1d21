"""The neighbourhood kernel that reads the qkv projection and normalises q and k itself.

`AttentionConfig(fused_qkv=True)`: in inference on one large scale, the Pallas kernel takes
the (B, N, 3, heads, D) projection; the model's logits must not change. The kernel runs in
Pallas' interpreter here; its CUDA lowering is checked with jax.export.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax import attention
from mvar_jax import transformer as tfm
from mvar_jax.attention import AttentionConfig
from mvar_jax.kernels.neighborhood_attention import pallas_kernel, reference

from test_na_pallas import _TRITON_TARGETS, _gpu_target
from test_transformer import MEDIUM, labels, logits, random_params, teacher_input, tiny_config


def _l2n(x):
  x32 = x.astype(jnp.float32)
  return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), 1e-12)


def _qkv(shape, dtype, seed):
  qkv = jax.random.normal(jax.random.key(seed), shape) * 2 + 0.3
  head_scale = jnp.exp(jax.random.normal(jax.random.key(seed + 1), (shape[3],)))
  return qkv.astype(dtype), head_scale


@pytest.mark.parametrize('height,width,kernel_size,dtype', [
    (6, 7, 5, jnp.float32), (13, 13, 7, jnp.float32), (16, 16, 7, jnp.bfloat16)])
def test_kernel_equals_the_unfused_kernel_on_normalised_inputs(height, width, kernel_size, dtype):
  n = height * width  # 42 and 169 rows: tails the 64-row tiles do not divide
  qkv, head_scale = _qkv((2, n, 3, 4, 64), dtype, seed=n)
  out = pallas_kernel.na2d_pallas_from_qkv(qkv, head_scale, height=height, width=width,
                                           kernel_size=kernel_size, interpret=True)
  q = (_l2n(qkv[:, :, 0]) * head_scale[None, None, :, None]).astype(dtype)
  k, v = _l2n(qkv[:, :, 1]).astype(dtype), qkv[:, :, 2]
  unfused = pallas_kernel.na2d_pallas(q, k, v, height=height, width=width,
                                      kernel_size=kernel_size, scale=1.0, interpret=True)
  assert out.shape == (2, n, 4, 64) and out.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(out.astype(jnp.float32), unfused.astype(jnp.float32),
                             rtol=tol, atol=tol)
  if dtype == jnp.float32:  # and the reference on the same inputs
    ref = reference.na2d_gather(q, k, v, height=height, width=width, kernel_size=kernel_size,
                                scale=1.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
  qkv, head_scale = _qkv((1, 36, 3, 4, 64), jnp.float32, seed=0)
  with pytest.raises(ValueError, match=r'\(B, 49, 3, heads, D\)'):
    pallas_kernel.na2d_pallas_from_qkv(qkv, head_scale, height=7, width=7, kernel_size=3,
                                       interpret=True)
  with pytest.raises(ValueError, match='head_scale'):
    pallas_kernel.na2d_pallas_from_qkv(qkv, head_scale[:2], height=6, width=6, kernel_size=3,
                                       interpret=True)


def _configs():
  attn = lambda fused: AttentionConfig(mode='mvar', refine_step=MEDIUM[1], kernel_size=MEDIUM[2],
                                       implementation='pallas', fused_qkv=fused)
  base = tiny_config(scales=MEDIUM, attention=attn(False))
  return base, tiny_config(scales=MEDIUM, attention=attn(True))


@pytest.mark.parametrize('first,last', [(5, 5), (6, 6), (0, 6)])
def test_model_logits_are_unchanged(monkeypatch, first, last):
  monkeypatch.setenv('MVAR_PALLAS_INTERPRET', '1')
  base, fused = _configs()
  params = random_params(base, seed=51)
  label_B, x = labels(base, 52, 2), teacher_input(base, 53, 2, first, last)
  np.testing.assert_allclose(logits(fused, params, label_B, x, first, last),
                             logits(base, params, label_B, x, first, last), rtol=2e-5, atol=2e-5)
  apply = lambda cfg, train: jax.make_jaxpr(lambda p: tfm.MVARTransformer(cfg).apply(
      {'params': p}, label_B, x, first=first, last=last, train=train,
      rngs={'dropout': jax.random.key(0)}))(params)
  one_large_scale = first == last
  assert str(apply(fused, False)).count('name=na2d_fwd_qkv') == (
      base.depth if one_large_scale else 0)
  assert 'na2d_fwd_qkv' not in str(apply(fused, True))  # training: the kernel with a backward


def test_only_inference_on_one_large_scale_with_the_pallas_kernel_fuses():
  cfg = AttentionConfig(refine_step=8, implementation='pallas', fused_qkv=True)
  fuses = lambda c=cfg, first=9, last=9, deterministic=True, dtype=jnp.bfloat16: (
      attention.uses_fused_qkv(c, first, last, 64, dtype, deterministic=deterministic))
  assert fuses()
  assert not fuses(first=7, last=7)  # dense scale
  assert not fuses(first=8, last=9)  # two maps in one call
  assert not fuses(deterministic=False)
  assert not fuses(AttentionConfig(refine_step=8, implementation='pallas'))
  assert not fuses(AttentionConfig(refine_step=8, implementation='blocked', fused_qkv=True))
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('data',))):
    assert not fuses()
  with pytest.raises(ValueError, match='fused_qkv'):
    AttentionConfig(fused_qkv='yes').validate(tiny_config().layout)


def test_lowers_for_cuda_at_the_sampler_shapes():
  # The last scale of d16 at batch 32 with CFG: 64 maps of 16x16, 16 heads of 64, bf16.
  qkv = jax.ShapeDtypeStruct((64, 256, 3, 16, 64), jnp.bfloat16)
  head_scale = jax.ShapeDtypeStruct((16,), jnp.float32)
  fn = lambda qkv, s: pallas_kernel.na2d_pallas_from_qkv(qkv, s, height=16, width=16,
                                                        kernel_size=7, interpret=False)
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _TRITON_TARGETS]
  with _gpu_target():
    text = jax.export.export(jax.jit(fn), platforms=('cuda',), disabled_checks=checks)(
        qkv, head_scale).mlir_module()
  assert sum(text.count(f'@{t}(') for t in _TRITON_TARGETS) == 1
  assert 'na2d_fwd_qkv' in text
