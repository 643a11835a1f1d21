"""One jitted tokenizer step with perceptual and adversarial losses (the VQGAN recipe).

Generator loss (taming-transformers' VQLPIPSWithDiscriminator / LlamaGen's VQLoss):
  rec  = l1 * |x - x'| + l2 * (x - x')^2 + perceptual * LPIPS(x, x')       (means)
  loss = rec + vq + lambda * g,   g = -mean(D(x'))                            (hinge)
  lambda = disc_weight * clip(||d rec / dW|| / (||d g / dW|| + 1e-4), 0, 1e4) with W the
           decoder's last conv kernel (`adaptive=True`, taming); `adaptive=False` uses
           lambda = disc_weight (LlamaGen's default).
Discriminator loss: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(sg(x'))))), on the
reconstructions of this step's generator forward (as LlamaGen; taming re-decodes).
Before `disc_start` the GAN terms are off: the discriminator is not run and not updated.

The state is a plain dict that Orbax checkpoints as is:
  {'params', 'opt_state', 'disc_params', 'disc_opt_state'}
(the discriminator uses GroupNorm, so there are no batch statistics to carry).

Plugging into a trainer:
    weights = tokenizer_step.LossWeights.from_config(config.tokenizer)
    state = tokenizer_step.init_state(params, tx, disc, disc_tx, jax.random.key(seed), (H, W, 3))
    state, metrics = tokenizer_step.gan_train_step(
        state, images, step, lpips_params, tok=tok, tx=tx, disc=disc, disc_tx=disc_tx,
        weights=weights, lpips_model=lpips_model)
`metrics['hits_SV']` is the same codebook hit count the plain step returns.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from mvar_jax import discriminator as disc_lib

# The decoder's output conv (taming's `decoder.conv_out.weight`): where the adaptive weight
# compares the two gradients.
LAST_LAYER = ('decoder', 'conv_out', 'kernel')


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Loss weights of the generator (hashable: a static argument of the jitted step)."""

  l1: float = 1.0  # pixel L1
  l2: float = 1.0  # pixel L2
  perceptual: float = 0.0  # LPIPS (needs lpips params; 0: off)
  disc: float = 0.0  # adversarial weight (0: no discriminator at all)
  disc_start: int = 0  # first step with GAN terms (generator and discriminator)
  adaptive: bool = True  # taming's adaptive weight; False: constant `disc`

  def validate(self) -> 'LossWeights':
    for name in ('l1', 'l2', 'perceptual', 'disc'):
      if getattr(self, name) < 0:
        raise ValueError(f'tokenizer loss weight {name} must be >= 0, got {getattr(self, name)}')
    if self.disc_start < 0:
      raise ValueError(f'tokenizer disc_start must be >= 0, got {self.disc_start}')
    return self

  @classmethod
  def from_config(cls, t) -> 'LossWeights':
    """From `config.tokenizer` fields (l1_weight, l2_weight, perceptual_weight, lpips_weights,
    disc_weight, disc_start, disc_adaptive); absent fields keep the defaults (plain L1 + L2).
    Without `lpips_weights` the perceptual loss is off, whatever its weight (logged)."""
    perceptual = t.get('perceptual_weight', 0.0)
    if perceptual and not t.get('lpips_weights', ''):
      logging.warning('tokenizer: perceptual_weight=%s but no lpips_weights: perceptual loss '
                      'off (make them with `python -m mvar_jax.lpips`)', perceptual)
      perceptual = 0.0
    return cls(l1=t.get('l1_weight', 1.0), l2=t.get('l2_weight', 1.0), perceptual=perceptual,
               disc=t.get('disc_weight', 0.0), disc_start=t.get('disc_start', 0),
               adaptive=t.get('disc_adaptive', True)).validate()


def discriminator_from_config(t):
  """(PatchDiscriminator, its optax optimizer) from `config.tokenizer`, or (None, None) when
  disc_weight is 0. Adam (disc_b1, disc_b2) at disc_lr (0: the tokenizer's lr), clipped."""
  if not t.get('disc_weight', 0.0):
    return None, None
  ndf = t.get('disc_ndf', 64)
  cfg = disc_lib.DiscriminatorConfig(ndf=ndf, num_layers=t.get('disc_layers', 3),
                                     norm_groups=min(32, ndf)).validate()
  tx = optax.chain(optax.clip_by_global_norm(t.get('grad_clip', 1.0)),
                   optax.adam(t.get('disc_lr', 0.0) or t.lr, b1=t.get('disc_b1', 0.9),
                              b2=t.get('disc_b2', 0.95)))
  return disc_lib.PatchDiscriminator(cfg), tx


def lpips_from_config(t):
  """(LPIPS module, params) when the perceptual loss is on, else (None, None)."""
  if not (t.get('perceptual_weight', 0.0) and t.get('lpips_weights', '')):
    return None, None
  from mvar_jax import lpips
  return lpips.LPIPS(t.get('precision', 'highest')), lpips.load_params(t.lpips_weights)


def adaptive_weight(rec_grad, gan_grad, disc_weight: float):
  """disc_weight * clip(||rec_grad|| / (||gan_grad|| + 1e-4), 0, 1e4), no gradient."""
  ratio = jnp.linalg.norm(rec_grad.ravel()) / (jnp.linalg.norm(gan_grad.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def init_state(params, tx: optax.GradientTransformation, disc: disc_lib.PatchDiscriminator | None,
               disc_tx: optax.GradientTransformation | None, rng, image_shape_HWC) -> dict:
  """The step's state dict; the discriminator entries are empty dicts when `disc` is None."""
  state = dict(params=params, opt_state=tx.init(params), disc_params={}, disc_opt_state={})
  if disc is not None:
    d = disc_lib.init_params(disc.config, rng, image_shape_HWC)
    state.update(disc_params=d, disc_opt_state=disc_tx.init(d))
  return state


def _generator_terms(params, images, disc_params, lpips_params, *, tok, disc, lpips_model,
                     weights: LossWeights, with_gan: bool):
  """((rec + vq, gan), aux): the two losses whose gradients the adaptive weight compares."""
  rec, vq_loss, hits_SV = tok(params, images)
  err = rec - images
  l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
  perceptual = (jnp.mean(lpips_model.apply({'params': lpips_params}, images, rec))
                if weights.perceptual else jnp.float32(0))
  rec_loss = weights.l1 * l1 + weights.l2 * l2 + weights.perceptual * perceptual
  gan = (disc_lib.hinge_g_loss(disc.apply({'params': disc_params}, rec)) if with_gan
         else jnp.float32(0))
  aux = dict(rec=rec, l1=l1, l2=l2, perceptual=perceptual, vq=vq_loss, hits_SV=hits_SV)
  return (rec_loss + vq_loss, gan), aux


@functools.partial(jax.jit, static_argnames=('tok', 'tx', 'disc', 'disc_tx', 'weights',
                                             'lpips_model'), donate_argnums=(0,))
def gan_train_step(state: dict, images, step, lpips_params=None, *, tok, tx, disc=None,
                   disc_tx=None, weights: LossWeights, lpips_model=None) -> tuple[dict, dict[str, Any]]:
  """One generator and one discriminator update; images (B, H, W, C) in [-1, 1].

  Returns (new state, metrics); metrics are scalars plus `hits_SV` (K, V) code hit counts.
  """
  if weights.perceptual and (lpips_model is None or lpips_params is None):
    raise ValueError('perceptual_weight > 0 needs LPIPS weights (tokenizer.lpips_weights); '
                     'set perceptual_weight=0 to train without the perceptual loss')
  use_gan = bool(weights.disc) and disc is not None
  if bool(weights.disc) and (disc is None or disc_tx is None):
    raise ValueError('disc_weight > 0 needs a discriminator and its optimizer')
  terms = functools.partial(_generator_terms, tok=tok, disc=disc, lpips_model=lpips_model,
                            weights=weights)

  def update_generator(state, grads, metrics):
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    metrics['grad_norm'] = optax.global_norm(grads)
    return dict(state, params=optax.apply_updates(state['params'], updates),
                opt_state=opt_state), metrics

  def metrics_of(losses, aux):
    m = {k: v for k, v in aux.items() if k != 'rec'}
    m['loss'] = losses[0]
    return m

  def plain_phase(state):
    (losses, vjp_fn, aux) = jax.vjp(
        lambda p: terms(p, images, state['disc_params'], lpips_params, with_gan=False),
        state['params'], has_aux=True)
    (grads,) = vjp_fn((jnp.float32(1), jnp.float32(0)))
    m = metrics_of(losses, aux)
    m.update(gan_g=jnp.float32(0), d_weight=jnp.float32(0), disc_loss=jnp.float32(0),
             logits_real=jnp.float32(0), logits_fake=jnp.float32(0))
    return update_generator(state, grads, m)

  def gan_phase(state):
    # One forward, two backward passes: the adaptive weight needs both gradients at the last
    # layer, and the full gradient is their weighted sum (the weight is a constant).
    (losses, vjp_fn, aux) = jax.vjp(
        lambda p: terms(p, images, state['disc_params'], lpips_params, with_gan=True),
        state['params'], has_aux=True)
    (g_rec,) = vjp_fn((jnp.float32(1), jnp.float32(0)))
    (g_gan,) = vjp_fn((jnp.float32(0), jnp.float32(1)))
    lam = (adaptive_weight(_leaf(g_rec, LAST_LAYER), _leaf(g_gan, LAST_LAYER), weights.disc)
           if weights.adaptive else jnp.float32(weights.disc))
    grads = jax.tree_util.tree_map(lambda a, b: a + lam * b, g_rec, g_gan)
    m = metrics_of(losses, aux)
    m['loss'] = losses[0] + lam * losses[1]

    fake = jax.lax.stop_gradient(aux['rec'])

    def d_loss_fn(dp):
      logits = disc.apply({'params': dp}, jnp.concatenate([images, fake]))
      real, fake_logits = jnp.split(logits, 2)
      return disc_lib.hinge_d_loss(real, fake_logits), (jnp.mean(real), jnp.mean(fake_logits))

    (d_loss, (lr_, lf_)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        state['disc_params'])
    d_updates, d_opt = disc_tx.update(d_grads, state['disc_opt_state'], state['disc_params'])
    m.update(gan_g=losses[1], d_weight=lam, disc_loss=d_loss, logits_real=lr_, logits_fake=lf_)
    state = dict(state, disc_params=optax.apply_updates(state['disc_params'], d_updates),
                 disc_opt_state=d_opt)
    return update_generator(state, grads, m)

  if not use_gan:
    return plain_phase(state)
  return jax.lax.cond(step >= weights.disc_start, gan_phase, plain_phase, state)
