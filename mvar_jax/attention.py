"""Attention patterns over a multi-scale token sequence.

A call sees the tokens of scales `first..last` (raster order within a scale,
scales one after another) and applies, per configuration:

- 'mvar' (scale-Markov + spatial-Markov): every token attends only within its own
  scale. Scales below `refine_step` run dense attention: each map of at least
  `ALONE_TOKENS` tokens alone, the smaller ones before it together under a
  block-diagonal mask; each scale at or above `refine_step` runs 2D neighbourhood
  attention with a k x k window (NATTEN border rule).
- 'var' (the VAR baseline): every token attends to its own scale and every earlier
  one (block-causal mask; the queries in the same groups of scales, each group against
  the keys up to its last scale). The sequence must then start at scale 0.

Since MVAR attention never crosses scales, splitting the sequence by pattern and
concatenating the results is exact, whatever `first..last` is.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from mvar_jax.kernels.neighborhood_attention import api as na_api
from mvar_jax.kernels.neighborhood_attention import reference as na_reference
from mvar_jax.layout import ScaleLayout

MODES = ('mvar', 'var')
# A dense scale with at least this many tokens (8x8) attends alone; smaller scales share one
# block-diagonal attention. On the 256 px pyramid, scales 0..7 attend as 0..5 (91 tokens), 6
# and 7: 22k instead of 65k score entries per head. d16 step on that segment: CPU fp32 batch 2
# gradient 5.94 instead of 6.47 s; H200 bf16 batch 32 step 41.1 instead of 49.1 ms
# (launch/results/h200_2026-11-27.md).
ALONE_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Static attention settings (hashable: safe as a jit static argument)."""

  mode: str = 'mvar'  # 'mvar' (block-diagonal + neighbourhood) or 'var' (block-causal)
  refine_step: int = 8  # first scale that uses neighbourhood attention in 'mvar' mode
  kernel_size: int = 7  # neighbourhood window (odd)
  implementation: str = 'auto'  # neighbourhood op: 'auto' | 'gather' | 'dense' | 'blocked' | 'pallas'
  # MVAR inference, one scale per call, with the Pallas kernel (GPU): one kernel reads the
  # qkv projection, adds its bias, l2-normalises q and k and attends (`from_qkv`), instead of
  # XLA passes that write q, k, v first and, below refine_step, several kernels of dense
  # attention (H100, d16 batch 32: 0.083 against 0.091 s per sampler call). Elsewhere
  # (training, CPU/TPU) it changes nothing.
  fused_qkv: bool = True

  def validate(self, layout: ScaleLayout) -> None:
    """Raises ValueError naming the field when the config cannot serve `layout`."""
    if self.mode not in MODES:
      raise ValueError(f'attention mode must be one of {MODES}, got {self.mode!r}')
    if not isinstance(self.fused_qkv, bool):
      raise ValueError(f'attention fused_qkv must be a bool, got {self.fused_qkv!r}')
    if self.implementation not in na_api.IMPLEMENTATIONS:
      raise ValueError(f'attention implementation must be one of {na_api.IMPLEMENTATIONS}, '
                       f'got {self.implementation!r}')
    if self.mode == 'var':
      return
    if not 0 <= self.refine_step <= layout.num_scales:
      raise ValueError(f'refine_step must be in [0, {layout.num_scales}] for {layout.num_scales} '
                       f'scales, got {self.refine_step}')
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f'kernel_size must be a positive odd integer, got {self.kernel_size}')
    if self.refine_step < layout.num_scales:
      pn = layout.patch_nums[self.refine_step]
      if self.kernel_size > pn:
        raise ValueError(
            f'kernel_size {self.kernel_size} is larger than the {pn}x{pn} map of scale '
            f'{self.refine_step} (refine_step={self.refine_step}); use kernel_size <= {pn} '
            'or a larger refine_step')

  def uses_neighborhood(self, si: int) -> bool:
    return self.mode == 'mvar' and si >= self.refine_step


@functools.lru_cache(maxsize=None)
def block_mask(layout: ScaleLayout, first: int, last: int, mode: str) -> np.ndarray:
  """(L_seg, L_seg) bool mask for scales first..last: block-diagonal or block-causal."""
  lvl = layout.level_ids(first, last)
  if mode == 'mvar':
    return lvl[:, None] == lvl[None, :]
  return lvl[:, None] >= lvl[None, :]


def dense_groups(layout: ScaleLayout, first: int, last: int) -> list[tuple[int, int]]:
  """Contiguous (first, last) groups of scales first..last, each run as one dense attention."""
  groups, start = [], first
  for si in range(first, last + 1):
    if layout.patch_nums[si] ** 2 >= ALONE_TOKENS:
      if start < si:
        groups.append((start, si - 1))
      groups.append((si, si))
      start = si + 1
  if start <= last:
    groups.append((start, last))
  return groups


def uses_fused_qkv(config: AttentionConfig, first: int, last: int, head_dim: int, dtype, *,
                   deterministic: bool) -> bool:
  """Whether this call's attention runs `from_qkv`: config.fused_qkv, MVAR inference on one
  scale, the Pallas kernel (what 'auto' picks on GPU) for this head dim and dtype. Under a
  mesh the kernel runs once per device on its maps (`per_shard.over_batch`)."""
  if not (config.fused_qkv and config.mode == 'mvar' and deterministic and first == last):
    return False
  if na_api.resolve_implementation(config.implementation) != 'pallas':
    return False
  from mvar_jax.kernels.neighborhood_attention import pallas_kernel
  return pallas_kernel.supports(head_dim, dtype)


def from_qkv(qkv_BL3HD, head_scale_H, *, layout: ScaleLayout, scale_index: int,
             config: AttentionConfig, scale: float = 1.0, bias_3HD=None):
  """MVAR attention of one scale from its qkv projection (B, L, 3, heads, D), one Pallas
  kernel: qkv += bias_3HD (3, heads, D), q = l2n(q) * head_scale and k = l2n(k) inside it;
  the k x k window on the large scales, the whole map (the dense attention of a scale) below
  refine_step. (B, L, heads, D).
  """
  from mvar_jax.kernels.neighborhood_attention import pallas_kernel
  pn = layout.patch_nums[scale_index]
  window = config.kernel_size if config.uses_neighborhood(scale_index) else None
  return pallas_kernel.na2d_pallas_from_qkv(qkv_BL3HD, head_scale_H, height=pn, width=pn,
                                            kernel_size=window, scale=scale, bias_3HD=bias_3HD)


def multiscale_attention(q_BLHD, k_BLHD, v_BLHD, *, layout: ScaleLayout, first: int, last: int,
                         config: AttentionConfig, scale: float = 1.0):
  """Attention over the tokens of scales first..last; returns (B, L_seg, heads, D)."""
  begin, end = layout.span(first, last)
  if q_BLHD.shape[1] != end - begin:
    raise ValueError(f'scales {first}..{last} hold {end - begin} tokens, got {q_BLHD.shape[1]}')
  if config.mode == 'var':
    if first != 0:
      raise ValueError("'var' attention needs the whole prefix: the sequence must start at scale 0")
    # The queries in the same groups, each against the keys of its scales and all earlier
    # ones: 289k instead of 462k score entries per head on the 256 px pyramid.
    mask = block_mask(layout, first, last, 'var')
    outputs = []
    for lo_s, hi_s in dense_groups(layout, first, last):
      lo, hi = layout.begin(lo_s), layout.end(hi_s)
      group_mask = mask[lo:hi, :hi]
      outputs.append(na_reference.masked_dense_attention(
          q_BLHD[:, lo:hi], k_BLHD[:, :hi], v_BLHD[:, :hi],
          None if group_mask.all() else jnp.asarray(group_mask), scale=scale))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)

  outputs = []
  dense_last = min(last, config.refine_step - 1)
  # The small scales: dense attention, block-diagonal within each group.
  for lo_s, hi_s in dense_groups(layout, first, dense_last):  # none when first > dense_last
    lo, hi = layout.begin(lo_s) - begin, layout.end(hi_s) - begin
    mask = None if lo_s == hi_s else jnp.asarray(block_mask(layout, lo_s, hi_s, 'mvar'))
    outputs.append(na_reference.masked_dense_attention(
        q_BLHD[:, lo:hi], k_BLHD[:, lo:hi], v_BLHD[:, lo:hi], mask, scale=scale))
  for si in range(max(first, config.refine_step), last + 1):  # the large scales: one map each
    lo, hi = layout.begin(si) - begin, layout.end(si) - begin
    pn = layout.patch_nums[si]
    outputs.append(na_api.neighborhood_attention(
        q_BLHD[:, lo:hi], k_BLHD[:, lo:hi], v_BLHD[:, lo:hi], height=pn, width=pn,
        kernel_size=config.kernel_size, scale=scale, implementation=config.implementation))
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
