"""A stand-in `natten` module for running the official MVAR code where NATTEN is missing.

The official MVAR imports `from natten import na2d` at module level. NATTEN ships no wheel
for every torch/CUDA pair (none for torch 2.11 + CUDA 13, and it cannot be built on a
machine without the toolkit), so `bench_vs_official.py` installs this module under the name
`natten` when the real one cannot be imported. Its `na2d` computes the same function with
stock torch ops:

  'sdpa'  F.scaled_dot_product_attention under the (N, N) boolean neighbourhood mask: what
          a user without NATTEN would write; dispatches to torch's memory-efficient (GPU) or
          math (CPU) kernel; O(N^2) per head, 65k entries at 16x16.
  'flex'  torch.nn.attention.flex_attention with a block mask from the same rule, compiled
          with torch.compile on GPU (block-sparse: skips the key blocks outside every window).
  'auto'  'flex' on CUDA (closest to NATTEN's fused kernels; NATTEN itself uses flex on some
          devices), falling back to 'sdpa' for good if the first flex call fails (e.g. no
          Triton); 'sdpa' on CPU (eager flex_attention is a slow reference there).

Window rule (NATTEN, dilation 1): query (i, j) of an H x W map sees the k x k window whose
top-left corner is (clamp(i - k//2, 0, H - k), clamp(j - k//2, 0, W - k)).
tests/test_natten_fallback.py checks both against numbers recorded from NATTEN itself.
"""

from __future__ import annotations

import functools
import sys
import types

import torch
import torch.nn.functional as F

KINDS = ('auto', 'sdpa', 'flex')
_AUTO_STATE = {}  # 'auto' on CUDA: which kind won the first call


def _starts(n: int, k: int, device=None):
  return torch.clamp(torch.arange(n, device=device) - k // 2, 0, n - k)


@functools.lru_cache(maxsize=None)
def neighborhood_mask(height: int, width: int, kernel_size: int, device: str = 'cpu'):
  """(N, N) bool, True where key n' lies in query n's window (raster order)."""
  rows, cols = _starts(height, kernel_size), _starts(width, kernel_size)
  r = torch.arange(height)
  c = torch.arange(width)
  row_ok = (r[None, :] >= rows[:, None]) & (r[None, :] < rows[:, None] + kernel_size)  # (H, H)
  col_ok = (c[None, :] >= cols[:, None]) & (c[None, :] < cols[:, None] + kernel_size)  # (W, W)
  mask = row_ok[:, None, :, None] & col_ok[None, :, None, :]  # (H, W, H', W')
  return mask.reshape(height * width, height * width).to(device)


def _check(query, kernel_size, dilation, stride=1, is_causal=False):
  if dilation not in (1, (1, 1)) or stride not in (1, (1, 1)) or is_causal:
    raise NotImplementedError('the natten fallback implements dilation 1, stride 1, non-causal')
  if isinstance(kernel_size, (tuple, list)):
    if len(set(kernel_size)) != 1:
      raise NotImplementedError(f'square kernels only, got {kernel_size}')
    kernel_size = kernel_size[0]
  if query.ndim != 5:
    raise ValueError(f'na2d expects (B, H, W, heads, D), got {tuple(query.shape)}')
  return int(kernel_size)


def na2d_sdpa(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False,
              scale=None, **unused):
  """natten.na2d's function via masked scaled_dot_product_attention; (B, H, W, heads, D)."""
  k = _check(query, kernel_size, dilation, stride, is_causal)
  b, h, w, heads, d = query.shape
  to_bhnd = lambda x: x.reshape(b, h * w, heads, d).transpose(1, 2)
  mask = neighborhood_mask(h, w, k, str(query.device))
  out = F.scaled_dot_product_attention(to_bhnd(query), to_bhnd(key), to_bhnd(value),
                                       attn_mask=mask, scale=scale)
  return out.transpose(1, 2).reshape(b, h, w, heads, d)


@functools.lru_cache(maxsize=None)
def _flex_block_mask(height: int, width: int, kernel_size: int, device: str):
  from torch.nn.attention.flex_attention import create_block_mask
  rows = _starts(height, kernel_size, device)
  cols = _starts(width, kernel_size, device)

  def in_window(b, h, q_idx, kv_idx):
    dr = kv_idx // width - rows[q_idx // width]
    dc = kv_idx % width - cols[q_idx % width]
    return (dr >= 0) & (dr < kernel_size) & (dc >= 0) & (dc < kernel_size)

  n = height * width
  return create_block_mask(in_window, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


@functools.lru_cache(maxsize=None)
def _flex_fn(device_type: str):
  from torch.nn.attention.flex_attention import flex_attention
  # Eager flex_attention is a slow reference; compiled it is the fused block-sparse kernel.
  return torch.compile(flex_attention) if device_type == 'cuda' else flex_attention


def na2d_flex(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False,
              scale=None, **unused):
  """natten.na2d's function via flex_attention with a neighbourhood block mask."""
  k = _check(query, kernel_size, dilation, stride, is_causal)
  b, h, w, heads, d = query.shape
  to_bhnd = lambda x: x.reshape(b, h * w, heads, d).transpose(1, 2).contiguous()
  block_mask = _flex_block_mask(h, w, k, str(query.device))
  out = _flex_fn(query.device.type)(to_bhnd(query), to_bhnd(key), to_bhnd(value),
                                    block_mask=block_mask, scale=scale)
  return out.transpose(1, 2).reshape(b, h, w, heads, d)


def na2d_auto(query, key, value, kernel_size, **kwargs):
  """'flex' on CUDA unless it failed once (decided apart for inference and for training,
  whose backward compiles separately), else 'sdpa'."""
  mode = 'train' if query.requires_grad else 'infer'
  if query.device.type != 'cuda' or _AUTO_STATE.get(mode) == 'sdpa':
    return na2d_sdpa(query, key, value, kernel_size, **kwargs)
  try:
    out = na2d_flex(query, key, value, kernel_size, **kwargs)
    _AUTO_STATE[mode] = 'flex'
    return out
  except Exception as e:  # noqa: BLE001 - any compile failure: the plain op still works
    if _AUTO_STATE.get(mode) == 'flex':
      raise
    print(f'natten fallback ({mode}): flex_attention failed ({type(e).__name__}: '
          f'{str(e)[:120]}); using SDPA+mask', file=sys.stderr)
    _AUTO_STATE[mode] = 'sdpa'
    return na2d_sdpa(query, key, value, kernel_size, **kwargs)


def describe(kind: str) -> str:
  """Label for tables: what ran in place of natten.na2d."""
  names = {'sdpa': 'torch SDPA+mask', 'flex': 'torch flex_attention (compiled)'}
  if kind == 'auto' and len(set(_AUTO_STATE.values())) > 1:
    used = ', '.join(f'{m}: {names[k]}' for m, k in sorted(_AUTO_STATE.items()))
    return f'na2d via {used}, natten unavailable'
  if kind == 'auto':
    kind = next(iter(_AUTO_STATE.values()), 'sdpa')
  return f'na2d via {names[kind]}, natten unavailable'


def real_natten_available() -> bool:
  try:
    import natten  # noqa: F401
  except Exception:  # ImportError, or a broken build raising at import
    return False
  return not getattr(sys.modules.get('natten'), '_MVAR_FALLBACK', False)


def install(kind: str = 'auto') -> str:
  """Makes `import natten` give the fallback (unless the real one imports); returns a label."""
  if kind not in KINDS:
    raise ValueError(f'natten fallback must be one of {KINDS}, got {kind!r}')
  if real_natten_available():
    import natten
    return f'natten {getattr(natten, "__version__", "?")}'
  module = types.ModuleType('natten')
  module.na2d = {'auto': na2d_auto, 'sdpa': na2d_sdpa, 'flex': na2d_flex}[kind]
  module._MVAR_FALLBACK = True
  module.__version__ = f'fallback-{kind}'
  sys.modules['natten'] = module
  return describe(kind)
