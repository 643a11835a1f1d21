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
LAST_NORM = ('decoder', 'norm_out')  # its output, through SiLU, is that conv's input


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


def _forward_to_last_conv(params, *, images, tok):
  """((reconstruction, vq loss), (code hits (K, V), the decoder's last conv input))."""
  (rec, vq_loss, hits_SV), inter = tok.module.apply(
      {'params': params}, images, mutable=['intermediates'],
      capture_intermediates=lambda mdl, _: mdl.path == LAST_NORM)
  h = jax.nn.silu(_leaf(inter['intermediates'], LAST_NORM)['__call__'][0])
  return (rec, vq_loss), (hits_SV, jax.lax.stop_gradient(h))


def _last_conv(h_BHWC, kernel_HWIO, tok):
  """The decoder's last conv without its bias (what its kernel gradient sees)."""
  from mvar_jax import vqvae
  return jax.lax.conv_general_dilated(
      h_BHWC, kernel_HWIO, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=vqvae.PRECISIONS[tok.config.precision])


def _reconstruction_terms(rec, *, images, lpips_params, lpips_model, weights: LossWeights):
  """(weighted L1 + L2 + LPIPS, (l1, l2, lpips)) of a reconstruction."""
  err = rec - images
  l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
  perceptual = (jnp.mean(lpips_model.apply({'params': lpips_params}, images, rec))
                if weights.perceptual else jnp.float32(0))
  return weights.l1 * l1 + weights.l2 * l2 + weights.perceptual * perceptual, (l1, l2, perceptual)


@functools.partial(jax.jit, static_argnames=('tok', 'tx', 'disc', 'disc_tx', 'weights',
                                             'lpips_model'), donate_argnums=(0,))
def gan_train_step(state: dict, images, step, lpips_params=None, *, tok, tx, disc=None,
                   disc_tx=None, weights: LossWeights, lpips_model=None) -> tuple[dict, dict[str, Any]]:
  """One generator and one discriminator update; images (B, H, W, C) in [-1, 1].

  `step` (int32 scalar) is the global step: the GAN terms are on when step >= disc_start.
  Returns (new state, metrics); metrics are scalars plus `hits_SV` (K, V) code hit counts.
  """
  if weights.perceptual and (lpips_model is None or lpips_params is None):
    raise ValueError('perceptual_weight > 0 needs LPIPS weights (tokenizer.lpips_weights); '
                     'set perceptual_weight=0 to train without the perceptual loss')
  if bool(weights.disc) and (disc is None or disc_tx is None):
    raise ValueError('disc_weight > 0 needs a discriminator and its optimizer')

  # One forward and one backward pass through the tokenizer, in both phases (the phase
  # switch below covers only the discriminator's share, so the tokenizer is compiled once).
  # The adaptive weight needs the two losses' gradients at the decoder's last conv only:
  # their gradients w.r.t. the reconstruction, pushed back through that conv alone. The
  # tokenizer's gradient is then one backward pass of the weighted sum (the weight is a
  # constant, as in taming's detach()).
  (rec, vq_loss), vjp_tok, (hits_SV, h_last) = jax.vjp(
      functools.partial(_forward_to_last_conv, images=images, tok=tok), state['params'],
      has_aux=True)
  rec_terms = functools.partial(_reconstruction_terms, images=images, lpips_params=lpips_params,
                                lpips_model=lpips_model, weights=weights)
  (rec_loss, (l1, l2, perceptual)), c_rec = jax.value_and_grad(rec_terms, has_aux=True)(rec)
  zero = jnp.float32(0)
  m = dict(l1=l1, l2=l2, perceptual=perceptual, vq=vq_loss, hits_SV=hits_SV, gan_g=zero,
           d_weight=zero, disc_loss=zero, logits_real=zero, logits_fake=zero)
  c_total = c_rec

  if weights.disc:
    def gan_on(disc_state):
      disc_params, disc_opt_state = disc_state
      gan, c_gan = jax.value_and_grad(
          lambda r: disc_lib.hinge_g_loss(disc.apply({'params': disc_params}, r)))(rec)
      if weights.adaptive:
        _, conv_vjp = jax.vjp(lambda k: _last_conv(h_last, k, tok),
                              _leaf(state['params'], LAST_LAYER))
        lam = adaptive_weight(conv_vjp(c_rec)[0], conv_vjp(c_gan)[0], weights.disc)
      else:
        lam = jnp.float32(weights.disc)
      fake = jax.lax.stop_gradient(rec)

      def d_loss_fn(dp):
        logits = disc.apply({'params': dp}, jnp.concatenate([images, fake]))
        real, fake_logits = jnp.split(logits, 2)
        return disc_lib.hinge_d_loss(real, fake_logits), (jnp.mean(real), jnp.mean(fake_logits))

      (d_loss, (real_, fake_)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
      d_updates, disc_opt_state = disc_tx.update(d_grads, disc_opt_state, disc_params)
      d_m = dict(gan_g=gan, d_weight=lam, disc_loss=d_loss, logits_real=real_, logits_fake=fake_)
      return (optax.apply_updates(disc_params, d_updates), disc_opt_state), lam * c_gan, d_m

    def gan_off(disc_state):  # before disc_start: the discriminator is neither run nor updated
      return disc_state, jnp.zeros_like(rec), {k: zero for k in
                                               ('gan_g', 'd_weight', 'disc_loss', 'logits_real',
                                                'logits_fake')}

    (disc_params, disc_opt_state), c_gan_weighted, d_m = jax.lax.cond(
        step >= weights.disc_start, gan_on, gan_off,
        (state['disc_params'], state['disc_opt_state']))
    state = dict(state, disc_params=disc_params, disc_opt_state=disc_opt_state)
    m.update(d_m)
    c_total = c_rec + c_gan_weighted

  (grads,) = vjp_tok((c_total, jnp.float32(1)))
  m['loss'] = rec_loss + vq_loss + m['d_weight'] * m['gan_g']
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  m['grad_norm'] = optax.global_norm(grads)
  return dict(state, params=optax.apply_updates(state['params'], updates),
              opt_state=opt_state), m
