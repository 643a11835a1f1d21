"""A functional PyTorch recomputation of the VAR / MVAR transformer, for tests.

Written from the formulas of MVAR_SPEC.md sections 2-3 (not from the official modules), on a
state dict with the official key names. Every step is spelled out (explicit masks, explicit
LayerNorm and attention), so it doubles as a readable statement of what the port must compute:

    logits_BLV = forward(state_dict, label_B, x_BlCv, patch_nums=(1, 2, 3, 4, 6),
                         first=0, last=4, mode='mvar', refine_step=3, kernel_size=3)

The attention pattern over the tokens of scales first..last is one boolean (L_seg, L_seg) mask:
- 'var': a token sees its own scale and every earlier one (block-causal; needs first == 0);
- 'mvar': a token sees only its own scale; below refine_step the whole scale, from refine_step
  on the k x k window of the NATTEN border rule (window start per axis clamp(i - k//2, 0, n - k)).
Any float dtype works; tests use float64 so that the reference adds no rounding of its own.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- masks

def neighborhood_mask(n: int, kernel_size: int) -> torch.Tensor:
  """(n*n, n*n) bool: query (i, j) of an n x n raster map sees its k x k NATTEN window."""
  if kernel_size % 2 == 0 or not 1 <= kernel_size <= n:
    raise ValueError(f'kernel_size must be odd and in [1, {n}], got {kernel_size}')
  half = kernel_size // 2
  mask = torch.zeros(n, n, n, n, dtype=torch.bool)
  for i in range(n):
    r0 = min(max(i - half, 0), n - kernel_size)
    for j in range(n):
      c0 = min(max(j - half, 0), n - kernel_size)
      mask[i, j, r0:r0 + kernel_size, c0:c0 + kernel_size] = True
  return mask.reshape(n * n, n * n)


def attention_mask(patch_nums: Sequence[int], first: int, last: int, mode: str,
                   refine_step: int, kernel_size: int) -> torch.Tensor:
  """(L_seg, L_seg) bool mask (True = may attend) for the tokens of scales first..last."""
  levels = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)
                      if first <= si <= last])
  if mode == 'var':
    if first != 0:
      raise ValueError("'var' attention needs the sequence to start at scale 0")
    return levels[:, None] >= levels[None, :]
  if mode != 'mvar':
    raise ValueError(f"mode must be 'mvar' or 'var', got {mode!r}")
  mask = levels[:, None] == levels[None, :]
  start = 0
  for si in range(first, last + 1):
    n = patch_nums[si]
    if si >= refine_step:
      mask[start:start + n * n, start:start + n * n] = neighborhood_mask(n, kernel_size)
    start += n * n
  return mask


# ----------------------------------------------------------------------------- layers

def linear(sd: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
  """x @ W^T + b with the torch Linear layout (out, in)."""
  bias = sd.get(f'{name}.bias')
  return F.linear(x, sd[f'{name}.weight'], bias)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
  """LayerNorm over the last axis without affine parameters (biased variance)."""
  mean = x.mean(-1, keepdim=True)
  var = (x - mean).square().mean(-1, keepdim=True)
  return (x - mean) / torch.sqrt(var + eps)


def self_attention(sd, prefix: str, x_BLC: torch.Tensor, mask_LL: torch.Tensor) -> torch.Tensor:
  """l2-normalised q, k; q times exp(min(scale_mul, ln 100)); softmax scale 1; masked."""
  b, l, c = x_BLC.shape
  scale_mul_1H11 = sd[f'{prefix}.scale_mul_1H11']
  h = scale_mul_1H11.shape[1]
  q_bias, v_bias = sd[f'{prefix}.q_bias'], sd[f'{prefix}.v_bias']
  qkv_bias = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
  qkv = F.linear(x_BLC, sd[f'{prefix}.mat_qkv.weight'], qkv_bias).view(b, l, 3, h, c // h)
  q_BHLD, k_BHLD, v_BHLD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
  head_scale_1H11 = torch.exp(torch.clamp(scale_mul_1H11, max=math.log(100.0)))
  q_BHLD = F.normalize(q_BHLD, dim=-1) * head_scale_1H11
  k_BHLD = F.normalize(k_BHLD, dim=-1)
  logits_BHLL = q_BHLD @ k_BHLD.transpose(-1, -2)  # softmax scale 1
  logits_BHLL = logits_BHLL.masked_fill(~mask_LL, float('-inf'))
  out_BHLD = torch.softmax(logits_BHLL, dim=-1) @ v_BHLD
  out_BLC = out_BHLD.transpose(1, 2).reshape(b, l, c)
  return linear(sd, f'{prefix}.proj', out_BLC)


def ffn(sd, prefix: str, x_BLC: torch.Tensor) -> torch.Tensor:
  hidden = F.gelu(linear(sd, f'{prefix}.fc1', x_BLC), approximate='tanh')
  return linear(sd, f'{prefix}.fc2', hidden)


def block(sd, index: int, x_BLC: torch.Tensor, cond_BD: torch.Tensor, mask_LL: torch.Tensor,
          eps: float = 1e-6) -> torch.Tensor:
  """One AdaLN block: x += attn(LN(x)(1+s1)+t1) g1; x += ffn(LN(x)(1+s2)+t2) g2."""
  prefix = f'blocks.{index}'
  ada_B6C = linear(sd, f'{prefix}.ada_lin.1', F.silu(cond_BD))
  gamma1, gamma2, scale1, scale2, shift1, shift2 = (
      chunk[:, None, :] for chunk in ada_B6C.chunk(6, dim=-1))
  h = layer_norm(x_BLC, eps) * (1 + scale1) + shift1
  x_BLC = x_BLC + self_attention(sd, f'{prefix}.attn', h, mask_LL) * gamma1
  h = layer_norm(x_BLC, eps) * (1 + scale2) + shift2
  return x_BLC + ffn(sd, f'{prefix}.ffn', h) * gamma2


# ----------------------------------------------------------------------------- model

def depth_of(sd: Mapping[str, torch.Tensor]) -> int:
  return 1 + max(int(m.group(1)) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k)))


def embed(sd, label_B: torch.Tensor, x_BlCv: torch.Tensor | None, *,
          patch_nums: Sequence[int], first: int, last: int) -> torch.Tensor:
  """Token embeddings (B, L_seg, C) of scales first..last."""
  begin = sum(pn * pn for pn in patch_nums[:first])
  end = sum(pn * pn for pn in patch_nums[:last + 1])
  cond_BD = F.embedding(label_B, sd['class_emb.weight'])
  parts = []
  if first == 0:
    first_l = patch_nums[0] ** 2
    parts.append(cond_BD[:, None, :].expand(-1, first_l, -1) + sd['pos_start'])
  if x_BlCv is not None and x_BlCv.shape[1] > 0:
    parts.append(linear(sd, 'word_embed', x_BlCv))
  x_BLC = torch.cat(parts, dim=1)
  assert x_BLC.shape[1] == end - begin, (x_BLC.shape, begin, end)
  levels = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])
  return x_BLC + F.embedding(levels[begin:end], sd['lvl_embed.weight'])[None] \
      + sd['pos_1LC'][:, begin:end]


def head(sd, x_BLC: torch.Tensor, cond_BD: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
  """AdaLN before the head, then the vocabulary projection: (B, L, V)."""
  scale, shift = (chunk[:, None, :] for chunk in
                  linear(sd, 'head_nm.ada_lin.1', F.silu(cond_BD)).chunk(2, dim=-1))
  return linear(sd, 'head', layer_norm(x_BLC, eps) * (1 + scale) + shift)


def forward(sd: Mapping[str, torch.Tensor], label_B: torch.Tensor, x_BlCv: torch.Tensor | None,
            *, patch_nums: Sequence[int], first: int, last: int, mode: str = 'mvar',
            refine_step: int = 8, kernel_size: int = 7, eps: float = 1e-6) -> torch.Tensor:
  """Logits (B, L_seg, V) of the tokens of scales first..last (no dropout: inference).

  x_BlCv: teacher inputs of the segment's tokens, without the class token when first == 0.
  """
  cond_BD = F.embedding(label_B, sd['class_emb.weight'])
  x_BLC = embed(sd, label_B, x_BlCv, patch_nums=patch_nums, first=first, last=last)
  mask_LL = attention_mask(patch_nums, first, last, mode, refine_step, kernel_size)
  for i in range(depth_of(sd)):
    x_BLC = block(sd, i, x_BLC, cond_BD, mask_LL, eps)
  return head(sd, x_BLC, cond_BD, eps)
