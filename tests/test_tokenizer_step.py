"""The GAN tokenizer step: hinge losses, adaptive weight, disc_start, one real jitted step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mvar_jax import discriminator as disc_lib, lpips, tokenizer_recipes, tokenizer_step as ts, vqvae

# The GAN step runs at 8 px (the smallest the patch discriminator takes with one strided
# layer: 8 -> 4 -> 3 -> 2x2 logits); LPIPS's five VGG stages need 16 px.
TOK_CFG = vqvae.VQVAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                            patch_nums=(1, 2, 4), using_sa=False, using_mid_sa=False,
                            norm_groups=8)
TOK_CFG_16 = dataclasses.replace(TOK_CFG, patch_nums=(1, 2, 4, 8))
DISC_CFG = disc_lib.DiscriminatorConfig(ndf=8, num_layers=1, norm_groups=8)


# ----------------------------------------------------------------------------- losses

def test_hinge_losses_on_hand_made_logits():
  real = jnp.array([2.0, 0.5, -1.0, 0.0])  # margins: 0, 0.5, 2, 1 -> mean 0.875
  fake = jnp.array([-3.0, -0.5, 1.0, 0.2])  # margins: 0, 0.5, 2, 1.2 -> mean 0.925
  np.testing.assert_allclose(disc_lib.hinge_d_loss(real, fake), 0.5 * (0.875 + 0.925), rtol=1e-6)
  np.testing.assert_allclose(disc_lib.hinge_g_loss(fake), -(-3.0 - 0.5 + 1.0 + 0.2) / 4, rtol=1e-6)
  # A discriminator that is confidently right everywhere has zero hinge loss.
  assert float(disc_lib.hinge_d_loss(jnp.full(3, 1.5), jnp.full(3, -1.0))) == 0.0


def test_adaptive_weight_is_the_gradient_norm_ratio_clamped():
  rng = np.random.default_rng(0)
  g_rec, g_gan = rng.standard_normal((3, 3, 8, 3)), rng.standard_normal((3, 3, 8, 3))
  want = 0.5 * np.sqrt((g_rec ** 2).sum()) / (np.sqrt((g_gan ** 2).sum()) + 1e-4)
  np.testing.assert_allclose(ts.adaptive_weight(jnp.asarray(g_rec), jnp.asarray(g_gan), 0.5),
                             want, rtol=1e-5)
  # A vanishing GAN gradient is clamped at 1e4 (times the weight), not infinite.
  np.testing.assert_allclose(ts.adaptive_weight(jnp.ones(4), jnp.zeros(4), 0.5), 0.5e4)


def test_discriminator_emits_patch_logits_and_validates():
  cfg = disc_lib.DiscriminatorConfig(ndf=8, num_layers=2, norm_groups=8)
  params = jax.eval_shape(lambda: disc_lib.init_params(cfg, jax.random.key(0), (16, 16, 3)))
  logits = jax.eval_shape(disc_lib.PatchDiscriminator(cfg).apply, {'params': params},
                          jnp.zeros((2, 16, 16, 3)))
  # 16 -> 8 -> 4 (strided), then two stride-1 4x4 convs with padding 1: 3, 2.
  assert logits.shape == (2, 2, 2, 1)
  assert [params[f'conv_{n}']['kernel'].shape[-1] for n in range(3)] == [8, 16, 32]
  with pytest.raises(ValueError, match='norm_groups'):
    disc_lib.DiscriminatorConfig(ndf=24, num_layers=2, norm_groups=16).validate()


# ----------------------------------------------------------------------------- the step

def _disc_params(cfg, image_shape_HWC, seed=0):
  """Upstream's init distribution drawn on the host (no compiled init)."""
  abstract = jax.eval_shape(lambda: disc_lib.init_params(cfg, jax.random.key(0), image_shape_HWC))
  rng = np.random.default_rng(seed)
  draw = {'kernel': lambda s: 0.02 * rng.standard_normal(s), 'scale': lambda s:
          1 + 0.02 * rng.standard_normal(s), 'bias': np.zeros}
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(draw[path[-1].key](a.shape), jnp.float32), abstract)


@functools.lru_cache(maxsize=None)
def _setup(cfg=TOK_CFG):
  tok = vqvae.Tokenizer(cfg)
  params = vqvae.random_params(cfg)  # host-drawn: compiling Flax's init costs more than the step
  disc = disc_lib.PatchDiscriminator(DISC_CFG)
  tx, disc_tx = optax.adam(1e-3), optax.adam(1e-3)
  s = cfg.resolution
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, s, s, 3)), jnp.float32)
  return tok, params, disc, tx, disc_tx, images


def _fresh_state(cfg=TOK_CFG, with_disc=True):
  tok, params, disc, tx, disc_tx, _ = _setup(cfg)
  params = jax.tree_util.tree_map(jnp.array, params)  # the step donates its state
  state = ts.init_state(params, tx, None, None, None, None)
  if with_disc:
    d = _disc_params(DISC_CFG, (cfg.resolution, cfg.resolution, 3))
    state.update(disc_params=d, disc_opt_state=disc_tx.init(d))
  return state


def _numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def _changed(a, b):
  return any(not np.array_equal(x, y) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


WEIGHTS = ts.LossWeights(l1=1.0, l2=1.0, disc=0.5, disc_start=5, adaptive=True)


def test_gan_step_updates_generator_and_discriminator_and_matches_the_adaptive_weight():
  tok, _, disc, tx, disc_tx, images = _setup()
  state = _fresh_state()
  before = _numpy(state)
  # The adaptive weight the step should use, computed directly from the two gradients.
  def rec_loss(p):
    rec, vq, _ = tok(p, images)
    return jnp.mean(jnp.abs(rec - images)) + jnp.mean(jnp.square(rec - images)) + vq
  def gan_loss(p):
    rec, _, _ = tok(p, images)
    return -jnp.mean(disc.apply({'params': before['disc_params']}, rec))
  last = lambda f: jax.grad(f)(before['params'])['decoder']['conv_out']['kernel']
  w_rec, w_gan = jax.jit(lambda: (last(rec_loss), last(gan_loss)))()
  want = 0.5 * np.linalg.norm(np.ravel(w_rec)) / (np.linalg.norm(np.ravel(w_gan)) + 1e-4)

  state, m = ts.gan_train_step(state, images, jnp.int32(5), tok=tok, tx=tx, disc=disc,
                               disc_tx=disc_tx, weights=WEIGHTS)
  np.testing.assert_allclose(m['d_weight'], want, rtol=1e-4)
  assert _changed(before['params'], state['params'])
  assert _changed(before['disc_params'], state['disc_params'])
  assert float(m['disc_loss']) > 0 and np.isfinite(float(m['loss']))
  np.testing.assert_allclose(m['loss'], m['l1'] + m['l2'] + m['vq'] + m['d_weight'] * m['gan_g'],
                             rtol=1e-5)
  assert m['hits_SV'].shape == (len(TOK_CFG.patch_nums), TOK_CFG.vocab_size)
  # The state is a plain dict of arrays (what Orbax checkpoints).
  assert set(state) == {'params', 'opt_state', 'disc_params', 'disc_opt_state'}


def test_before_disc_start_the_discriminator_is_frozen_and_the_loss_has_no_gan_term():
  tok, _, disc, tx, disc_tx, images = _setup()
  state = _fresh_state()
  before = _numpy(state)
  state, m = ts.gan_train_step(state, images, jnp.int32(4), tok=tok, tx=tx, disc=disc,
                               disc_tx=disc_tx, weights=WEIGHTS)
  assert not _changed(before['disc_params'], state['disc_params'])
  assert not _changed(before['disc_opt_state'], state['disc_opt_state'])
  assert float(m['d_weight']) == 0.0 and float(m['gan_g']) == 0.0
  np.testing.assert_allclose(m['loss'], m['l1'] + m['l2'] + m['vq'], rtol=1e-6)
  assert _changed(before['params'], state['params'])


def test_perceptual_term_enters_the_loss_and_needs_weights():
  tok, _, _, tx, _, images = _setup(TOK_CFG_16)
  weights = ts.LossWeights(perceptual=1.0)
  with pytest.raises(ValueError, match='LPIPS weights'):
    ts.gan_train_step(_fresh_state(TOK_CFG_16, False), images, jnp.int32(0), tok=tok, tx=tx,
                      weights=weights)
  rng = np.random.default_rng(2)  # random trunk, non-negative heads (as learned ones); no init compile
  lp_params = jax.tree_util.tree_map(
      lambda s: np.abs(0.05 * rng.standard_normal(s.shape)).astype(np.float32),
      jax.eval_shape(lambda: lpips.init_params(jax.random.key(0))))
  _, m = ts.gan_train_step(_fresh_state(TOK_CFG_16, False), images, jnp.int32(0), lp_params,
                           tok=tok, tx=tx, weights=weights, lpips_model=lpips.LPIPS())
  assert float(m['perceptual']) > 0
  np.testing.assert_allclose(m['loss'], m['l1'] + m['l2'] + m['vq'] + m['perceptual'], rtol=1e-5)


@pytest.mark.parametrize('recipe', tokenizer_recipes.RECIPES)
def test_every_recipe_configures_the_step(recipe):
  t = tokenizer_recipes.loss_fields(recipe, steps=300)
  t.lr, t.grad_clip = 1e-4, 1.0
  w = ts.LossWeights.from_config(t)
  # No lpips_weights configured: the perceptual loss is off, whatever the recipe's weight.
  assert w.perceptual == 0.0
  assert (w.l1, w.l2, w.disc, w.disc_start) == (t.l1_weight, t.l2_weight, t.disc_weight,
                                                t.disc_start)
  disc, disc_tx = ts.discriminator_from_config(t)
  assert (disc is None) == (recipe == 'plain') == (disc_tx is None)
  t.lpips_weights = '/nonexistent/lpips_vgg.msgpack'
  assert ts.LossWeights.from_config(t).perceptual == t.perceptual_weight
  if t.perceptual_weight:
    with pytest.raises(FileNotFoundError, match='mvar_jax.lpips'):
      ts.lpips_from_config(t)


def test_recipe_and_weight_validation():
  with pytest.raises(ValueError, match='recipe must be one of'):
    tokenizer_recipes.loss_fields('vqgan')
  with pytest.raises(ValueError, match='steps'):
    tokenizer_recipes.loss_fields('demo')
  with pytest.raises(ValueError, match='disc_start'):
    ts.LossWeights(disc_start=-1).validate()
