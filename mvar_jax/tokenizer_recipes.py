"""Loss recipes of the VQGAN family, as `config.tokenizer` fields, each number with its source.

VAR's paper trains its multi-scale VQ-VAE "with the compound loss" of VQGAN (pixel
reconstruction, perceptual LPIPS and a patch-GAN term) but publishes no weights or
schedule for it; the released repositories ship only the trained tokenizer. So the
recipes below are the two public VQGAN-family recipes VAR's design follows:

`taming` — CompVis/taming-transformers @3ba01b2, configs/imagenet_vqgan.yaml and
  taming/modules/losses/vqperceptual.py (VQLPIPSWithDiscriminator), taming/models/vqgan.py:
  pixel L1 weight 1.0 (pixelloss_weight default), perceptual 1.0 (perceptual_weight default),
  disc_weight 0.8 and disc_start 250001 (imagenet_vqgan.yaml), adaptive weight on
  (calculate_adaptive_weight), codebook weight 1.0, hinge loss, NLayerDiscriminator with
  ndf 64 and 3 layers (defaults); Adam betas (0.5, 0.9) for both nets (vqgan.py), lr
  4.5e-6 per image (base_learning_rate x batch x GPUs, main.py).
`llamagen` — FoundationVision/LlamaGen @ce98ec4, tokenizer/tokenizer_image/vq_train.py
  arguments and vq_loss.py (VQLoss): pixel L2 weight 1.0 (reconstruction-loss 'l2',
  reconstruction-weight 1.0), perceptual 1.0, disc-weight 0.5, disc-start 20000, adaptive
  weight off (VQLoss default disc_adaptive_weight=False, not set by vq_train.py), patchgan
  discriminator, hinge losses, codebook l2-norm True, codebook embed dim 8, commit beta
  0.25, codebook weight 1.0; Adam lr 1e-4, betas (0.9, 0.95), grad clip 1.0, batch 128, for
  both nets.
`demo` — ours, for the demo's scale (32 px, a few hundred steps, and no ImageNet VGG16: the
  perceptual loss then runs on a random VGG16 trunk). The random-trunk LPIPS of a blurry
  reconstruction is ~0.01 against an L1 of ~0.1, so its weight is 10 to give it the pull the
  calibrated LPIPS has at weight 1. The GAN starts after two thirds of the steps at weight
  0.1 with the adaptive weight on (an untrained discriminator at 0.5 from a third of the
  steps cost LPIPS and sharpness). Measured at 300 steps against 'plain' (same data and
  initialisation; held-out LPIPS 0.0074 vs 0.0084, under a second random trunk 0.0102 vs
  0.0108, high-frequency energy ratio 0.289 vs 0.166, PSNR 24.5 vs 24.8 dB): the issue-11
  table in launch/results/cpu_2026-11-26.md, `tools/compare_tokenizer_recipes.py`.

Fields the tokenizer trainer reads (see tokenizer_step.LossWeights.from_config):
l1_weight, l2_weight, perceptual_weight, lpips_weights (path; '' = perceptual loss off),
disc_weight (0 = no GAN), disc_start, disc_adaptive, disc_ndf, disc_layers, disc_lr,
disc_b1, disc_b2. Fields recorded for the reader that the trainer refuses when set:
codebook_l2_norm, codebook_dim (our quantizer is VAR's: no l2-norm, full-width codes, so the
released VAR VQ-VAE loads unchanged; configs/tokenizer.py resets them).
"""

from __future__ import annotations

import ml_collections

RECIPES = ('plain', 'taming', 'llamagen', 'demo')


def loss_fields(recipe: str, steps: int | None = None) -> ml_collections.ConfigDict:
  """The `config.tokenizer` loss fields of `recipe` (one of RECIPES).

  `steps` (the run's length) is only used by 'demo' to place disc_start.
  """
  c = ml_collections.ConfigDict()
  c.l1_weight = 1.0  # pixel L1
  c.l2_weight = 1.0  # pixel L2
  c.perceptual_weight = 0.0  # LPIPS(VGG16) weight; needs lpips_weights
  c.lpips_weights = ''  # lpips_vgg.msgpack from `python -m mvar_jax.lpips`; '': perceptual loss off
  c.disc_weight = 0.0  # adversarial weight (0: no discriminator)
  c.disc_start = 0  # first step with GAN terms
  c.disc_adaptive = True  # taming's gradient-ratio weight; False: constant disc_weight
  c.disc_ndf = 64  # discriminator base width
  c.disc_layers = 3  # discriminator strided layers
  c.disc_lr = 0.0  # discriminator learning rate (0: the tokenizer's lr)
  c.disc_b1, c.disc_b2 = 0.9, 0.95  # discriminator Adam betas
  c.codebook_l2_norm = False  # recorded only; True is refused (see module docstring)
  c.codebook_dim = 0  # recorded only; 0: the code width z_channels
  if recipe == 'plain':  # ours so far: L1 + L2 + VQ
    return c
  if recipe == 'taming':
    c.l1_weight, c.l2_weight = 1.0, 0.0
    c.perceptual_weight = 1.0
    c.disc_weight, c.disc_start, c.disc_adaptive = 0.8, 250_001, True
    c.disc_b1, c.disc_b2 = 0.5, 0.9
    return c
  if recipe == 'llamagen':
    c.l1_weight, c.l2_weight = 0.0, 1.0
    c.perceptual_weight = 1.0
    c.disc_weight, c.disc_start, c.disc_adaptive = 0.5, 20_000, False
    c.disc_lr = 1e-4
    c.disc_b1, c.disc_b2 = 0.9, 0.95
    c.codebook_l2_norm, c.codebook_dim = True, 8
    return c
  if recipe == 'demo':
    if not steps or steps < 3:
      raise ValueError(f"recipe 'demo' needs the run's steps (>= 3) to place disc_start, got {steps}")
    c.perceptual_weight = 10.0  # a random VGG16 trunk's LPIPS is ~10x below the calibrated one
    c.disc_weight, c.disc_start, c.disc_adaptive = 0.1, 2 * steps // 3, True
    c.disc_ndf, c.disc_layers = 32, 2  # 32 px images: 8x8 -> 6x6 patch logits
    return c
  raise ValueError(f'tokenizer recipe must be one of {RECIPES}, got {recipe!r}')
