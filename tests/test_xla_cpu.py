"""Per-program XLA:CPU options: the probe, and the VQ-VAE's convolutions on Eigen."""

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax import api, vqvae, xla_cpu

YNN_DOTS_ONLY = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}
TINY_VQVAE = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
                               vocab_size=16, patch_nums=(1, 2, 4), using_sa=False,
                               using_mid_sa=False)


def conv_fusions(compiled) -> list[str]:
  """Names of a compiled XLA:CPU program's YNNPACK fusions that hold a convolution."""
  return [name for name, body in xla_cpu.ynn_fusions(compiled.as_text()).items()
          if ' convolution(' in body]


def test_an_option_this_xla_does_not_know_leaves_its_defaults():
  assert xla_cpu.options_if_known(YNN_DOTS_ONLY) == tuple(YNN_DOTS_ONLY.items())
  assert xla_cpu.options_if_known({'xla_cpu_no_such_option': True}) == ()


def test_the_vqvae_programs_give_their_convolutions_to_eigen_on_cpu():
  """With XLA:CPU's defaults YNNPACK takes the VQ-VAE's 3x3 convolutions and ran them on one
  core; with the VQ-VAE's options it takes matmuls only. Other backends: XLA's defaults."""
  assert xla_cpu.conv_net_options('cpu') == YNN_DOTS_ONLY
  assert xla_cpu.conv_net_options('gpu') is None and xla_cpu.conv_net_options('tpu') is None

  cfg = TINY_VQVAE
  tok = vqvae.Tokenizer(cfg)
  params = vqvae.init_params(cfg, jax.random.key(0, impl='unsafe_rbg'))['params']
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  # If XLA stops giving YNNPACK the convolutions, this fails and says the option can go.
  assert conv_fusions(jax.jit(tok.img_to_ids).lower(params, images).compile())
  ours = api._jit_encode(tok).lower(params, images).compile()
  assert not conv_fusions(ours)
  ids = ours(params, images)
  decode = api._jit_decode(tok).lower(params, ids).compile()
  assert not conv_fusions(decode)
  # Same tokens and images as under the defaults.
  for a, b in zip(ids, tok.img_to_ids(params, images)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(decode(params, ids), (tok.ids_to_img(params, ids) + 1) / 2,
                             atol=1e-5)


def test_the_other_convolutional_programs_give_their_convolutions_to_eigen_on_cpu():
  """Inception (FID), LPIPS, the tokenizer's evaluation and dead-code restarts, and the class
  judge compile with the same options: with XLA's defaults Inception took 2.0x and LPIPS 1.4x
  as long here (launch/results/cpu_2026-11-28.md)."""
  from mvar_jax import class_consistency, lpips, tokenizer_eval, train_tokenizer
  from mvar_jax.evaluation import features, inception
  extractor = features.FeatureExtractor(inception.random_params(0), per_device_batch=1)
  images = np.zeros((extractor.global_batch, 16, 16, 3), np.uint8)
  assert not conv_fusions(extractor._fn.lower(extractor.params, images).compile())

  x = jnp.zeros((1, 16, 16, 3), jnp.float32)
  lpips_model = lpips.LPIPS()
  lpips_params = jax.eval_shape(lpips_model.init, jax.random.key(0), x, x)
  lpips_apply = tokenizer_eval._jit_apply(lpips_model)
  assert not conv_fusions(lpips_apply.lower(lpips_params, x, x).compile())

  cfg = TINY_VQVAE
  tok = vqvae.Tokenizer(cfg)
  params = jax.eval_shape(lambda: vqvae.init_params(cfg, jax.random.key(0))['params'])
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  assert not conv_fusions(tokenizer_eval._jit_reconstruct(tok).lower(params, images).compile())
  restart_encoder = train_tokenizer._jit_encoder_features(tok)
  assert not conv_fusions(restart_encoder.lower(params, images).compile())

  judge = class_consistency._predict_fn(10)
  judge_params = jax.eval_shape(class_consistency.ShapeClassifier(10).init, jax.random.key(0), x)
  assert not conv_fusions(judge.lower(judge_params, x).compile())
