"""VQGAN-family patch discriminator and its hinge losses.

Layout of taming-transformers' / LlamaGen's `NLayerDiscriminator` (pix2pix PatchGAN):
Conv4x4/2 -> LeakyReLU(0.2), then `num_layers - 1` x [Conv4x4/2 -> norm -> LeakyReLU],
Conv4x4/1 -> norm -> LeakyReLU, Conv4x4/1 -> one logit per patch. Widths ndf * min(2^n, 8).
Conv weights ~ N(0, 0.02), norm scale ~ N(1, 0.02) (their init).

Norm: GroupNorm instead of their BatchNorm. Upstream runs the real and the fake batch
through separate train-mode BatchNorm passes, so each is normalised with its own batch
statistics and running averages are never used for the loss; GroupNorm normalises each
image alone, which keeps that "no cross-talk between real and fake" property, has no
running statistics to carry in the train state or to synchronise across devices, and
behaves the same in training and evaluation.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  ndf: int = 64  # width of the first conv
  num_layers: int = 3  # strided convs after the first (taming/LlamaGen: 3 -> 30x30 patches at 256 px)
  norm_groups: int = 32  # GroupNorm groups (must divide every width)

  def validate(self) -> 'DiscriminatorConfig':
    if self.ndf < 1 or self.num_layers < 1:
      raise ValueError(f'discriminator ndf and num_layers must be >= 1, got {self.ndf}, '
                       f'{self.num_layers}')
    for w in self.widths:
      if w % self.norm_groups:
        raise ValueError(f'discriminator norm_groups={self.norm_groups} must divide every '
                         f'width {self.widths}')
    return self

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(self.ndf * min(2 ** n, 8) for n in range(self.num_layers + 1))


class PatchDiscriminator(nn.Module):
  """Images (B, H, W, C) in [-1, 1] -> patch logits (B, h, w, 1)."""

  config: DiscriminatorConfig

  @nn.compact
  def __call__(self, x_BHWC):
    cfg = self.config
    conv = lambda f, stride, name, bias: nn.Conv(
        f, (4, 4), strides=stride, padding=1, use_bias=bias, name=name,
        kernel_init=nn.initializers.normal(0.02))
    norm = lambda name: nn.GroupNorm(
        num_groups=cfg.norm_groups, epsilon=1e-5, name=name,
        scale_init=lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d))
    w = cfg.widths
    x = nn.leaky_relu(conv(w[0], 2, 'conv_0', True)(x_BHWC), 0.2)
    for n in range(1, cfg.num_layers + 1):
      stride = 2 if n < cfg.num_layers else 1  # the last hidden conv keeps the resolution
      x = nn.leaky_relu(norm(f'norm_{n}')(conv(w[n], stride, f'conv_{n}', False)(x)), 0.2)
    return conv(1, 1, 'conv_out', True)(x)


def init_params(config: DiscriminatorConfig, rng, image_shape_HWC) -> dict:
  x = jnp.zeros((1, *image_shape_HWC), jnp.float32)
  return jax.jit(PatchDiscriminator(config.validate()).init)(rng, x)['params']


def hinge_d_loss(logits_real, logits_fake):
  """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
  return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
  """Generator loss -E[D(G(z))]."""
  return -jnp.mean(logits_fake)
