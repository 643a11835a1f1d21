"""The tiny VQ-VAE and transformer that every benchmark's `--smoke` run uses, and random
weights for any model size without compiling an init.

    v_cfg, t_cfg = smoke_configs.tiny(depth=1, mode='mvar')

A 5-scale pyramid (1..6) over a 64-entry codebook, a width-64 transformer and a two-level
decoder without attention: small enough to compile and run in seconds on a CPU, yet with
every stage of the real pipeline (CFG, top-k/top-p, a neighbourhood window that does not
cover the largest map, the decoder). One place, so that bench_model, bench_memory and
profile_sampler check the same thing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

PATCH_NUMS = (1, 2, 3, 4, 6)
VOCAB = 64
TOP_K = 10  # below VOCAB, so the top-k path is exercised


def tiny(depth: int = 1, *, mode: str = 'mvar', dtype: str = 'float32',
         implementation: str = 'auto'):
  """(VQVAEConfig, TransformerConfig) of the smoke model; `mode`: 'mvar' or 'var'."""
  from mvar_jax import transformer, vqvae
  from mvar_jax.attention import AttentionConfig
  v_cfg = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
                            vocab_size=VOCAB, patch_nums=PATCH_NUMS, using_sa=False,
                            using_mid_sa=False)
  # refine_step 4 and a 3x3 window: the last scale (6x6) is a refinement scale whose window
  # is smaller than its map, as at full size.
  attention = AttentionConfig(mode=mode, refine_step=4, kernel_size=3,
                              implementation=implementation)
  t_cfg = transformer.TransformerConfig(depth=depth, width=64, num_heads=2, vocab_size=VOCAB,
                                        cvae=8, patch_nums=PATCH_NUMS, dtype=dtype,
                                        attention=attention)
  return v_cfg, t_cfg


def random_params(abstract_tree, rng, scale: float = 0.02):
  """Arrays of `abstract_tree`'s shapes and dtypes (ShapeDtypeStructs, boxed or not), drawn
  N(0, scale^2) with numpy's `rng`: a threefry init of d16 compiles for minutes on a CPU, and
  a benchmark's time does not depend on the values."""
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), nn.unbox(abstract_tree))
