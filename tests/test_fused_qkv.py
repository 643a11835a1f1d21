"""One Pallas kernel per attention: it reads the qkv projection and normalises q and k itself.

`AttentionConfig(fused_qkv=True)`: in MVAR inference on one scale, the kernel takes the
(B, N, 3, heads, D) projection (the k x k window on large scales, the whole map on small
ones); the model's logits must not change. The kernel runs in
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

from cuda_lowering import compile_for_sm90, export_for_cuda, triton_calls
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


@pytest.mark.parametrize('kernel_size', [5, None])
def test_the_kernel_adds_each_parts_bias_as_the_model_does(kernel_size):
  """bias_3HD is added to q, k and v rows as they load, rounded as XLA's separate add."""
  dtype = jnp.bfloat16
  qkv, head_scale = _qkv((2, 49, 3, 4, 64), dtype, seed=3)
  bias = (jax.random.normal(jax.random.key(4), (3, 4, 64)) * 3).astype(dtype)
  run = lambda x, b: pallas_kernel.na2d_pallas_from_qkv(
      x, head_scale, height=7, width=7, kernel_size=kernel_size, bias_3HD=b, interpret=True)
  with_bias = run(qkv, bias)
  pre_added = run((qkv + bias[None, None]).astype(dtype), None)
  np.testing.assert_array_equal(np.asarray(with_bias, np.float32), np.asarray(pre_added, np.float32))
  assert not np.allclose(np.asarray(with_bias, np.float32), np.asarray(run(qkv, None), np.float32),
                         atol=1e-2)
  with pytest.raises(ValueError, match=r'bias \(4, 64\) must be \(3, 4, 64\)'):
    run(qkv, bias[0])


@pytest.mark.parametrize('side', [1, 4, 5, 10])
def test_whole_map_is_dense_attention(side):
  qkv, head_scale = _qkv((2, side * side, 3, 4, 64), jnp.float32, seed=side)
  out = pallas_kernel.na2d_pallas_from_qkv(qkv, head_scale, height=side, width=side,
                                           kernel_size=None, interpret=True)
  q = _l2n(qkv[:, :, 0]) * head_scale[None, None, :, None]
  dense = reference.masked_dense_attention(q, _l2n(qkv[:, :, 1]), qkv[:, :, 2], None, scale=1.0)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='square'):
    pallas_kernel.na2d_pallas_from_qkv(qkv, head_scale, height=side, width=side + 1,
                                       kernel_size=None, interpret=True)


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


@pytest.mark.parametrize('first,last', [(0, 0), (3, 3), (6, 6), (0, 6)])
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
  one_scale = first == last
  assert str(apply(fused, False)).count('name=na2d_fwd_qkv') == (base.depth if one_scale else 0)
  assert 'na2d_fwd_qkv' not in str(apply(fused, True))  # training: the kernel with a backward


def test_only_mvar_inference_on_one_scale_with_the_pallas_kernel_fuses():
  cfg = AttentionConfig(refine_step=8, implementation='pallas', fused_qkv=True)
  fuses = lambda c=cfg, first=9, last=9, deterministic=True, dtype=jnp.bfloat16: (
      attention.uses_fused_qkv(c, first, last, 64, dtype, deterministic=deterministic))
  assert fuses() and fuses(first=7, last=7) and fuses(first=0, last=0)
  assert not fuses(first=8, last=9)  # two maps in one call
  assert not fuses(first=0, last=7)  # block-diagonal over several scales
  assert not fuses(AttentionConfig(mode='var', implementation='pallas', fused_qkv=True))
  assert not fuses(deterministic=False)
  assert not fuses(AttentionConfig(refine_step=8, implementation='pallas', fused_qkv=False))
  assert AttentionConfig().fused_qkv  # the default: on wherever it applies (GPU inference)
  assert not fuses(AttentionConfig(refine_step=8, implementation='blocked', fused_qkv=True))
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('data',))):
    assert fuses()  # per device on its maps: tests/test_per_shard.py
  with pytest.raises(ValueError, match='fused_qkv'):
    AttentionConfig(fused_qkv='yes').validate(tiny_config().layout)


@pytest.mark.parametrize('side,kernel_size', [(16, 7), (10, None), (1, None)])
def test_lowers_for_cuda_at_the_sampler_shapes(side, kernel_size):
  # d16 at batch 32 with CFG: 64 maps, 16 heads of 64, bf16; the last scale, the last dense
  # one, the first (one token).
  qkv = jax.ShapeDtypeStruct((64, side * side, 3, 16, 64), jnp.bfloat16)
  head_scale = jax.ShapeDtypeStruct((16,), jnp.float32)
  fn = lambda qkv, s: pallas_kernel.na2d_pallas_from_qkv(
      qkv, s, height=side, width=side, kernel_size=kernel_size, interpret=False)
  text = export_for_cuda(fn, qkv, head_scale)
  assert len(triton_calls(text)) == 1
  assert 'na2d_fwd_qkv' in text


@pytest.mark.parametrize('side,kernel_size', [(16, 7), (10, None)])
def test_triton_compiles_for_sm90_at_the_sampler_shapes(tmp_path, side, kernel_size):
  qkv = jax.ShapeDtypeStruct((64, side * side, 3, 16, 64), jnp.bfloat16)
  head_scale = jax.ShapeDtypeStruct((16,), jnp.float32)
  fn = lambda qkv, s: pallas_kernel.na2d_pallas_from_qkv(
      qkv, s, height=side, width=side, kernel_size=kernel_size, interpret=False)
  kernels = compile_for_sm90(fn, qkv, head_scale, workdir=tmp_path)
  assert list(kernels) == ['na2d_fwd_qkv']
  assert 'wgmma' in kernels['na2d_fwd_qkv'].ptx  # Hopper's bf16 matrix instructions


def test_the_sampler_draws_the_same_tokens(monkeypatch):
  """Every scale of the sampler is one call: all of them run the fused kernel."""
  import dataclasses

  from mvar_jax import api, vqvae
  monkeypatch.setenv('MVAR_PALLAS_INTERPRET', '1')
  patch_nums = (1, 2, 3, 4, 6)
  v_cfg = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                            patch_nums=patch_nums, using_sa=False)
  attn = AttentionConfig(refine_step=4, kernel_size=3, implementation='pallas', fused_qkv=False)
  t_cfg = tfm.TransformerConfig(depth=1, width=32, num_heads=2, vocab_size=32, cvae=8,
                                num_classes=5, patch_nums=patch_nums, attention=attn).validate()
  v_params = vqvae.init_params(v_cfg, jax.random.key(0, impl='unsafe_rbg'))['params']
  t_params = random_params(t_cfg, seed=61)
  fused_cfg = dataclasses.replace(t_cfg, attention=dataclasses.replace(attn, fused_qkv=True))
  kw = dict(labels=[0, 3, 4], cfg=2.0, top_k=8, top_p=0.9)
  pipes = [api.MVARPipeline(v_cfg, v_params, c, t_params) for c in (t_cfg, fused_cfg)]
  want, got = (p.sample(jax.random.key(7), **kw) for p in pipes)
  for x, y in zip(want.ids, got.ids):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_allclose(got.images_BHW3, want.images_BHW3, atol=1e-6)
  from mvar_jax import sampling
  programs = [sampling.compile_sampler(p.transformer, p.transformer_params, p.tokenizer,
                                       p.tokenizer_params, batch_size=3, cfg=2.0,
                                       top_k=8).executable.as_text() for p in pipes]
  assert 'na2d_fwd_qkv' not in programs[0] and 'na2d_fwd_qkv' in programs[1]
