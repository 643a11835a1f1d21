"""Writes tests/fixtures/natten_na2d.npz: NATTEN's na2d outputs for a few small maps.

  python tests/make_natten_fixtures.py

Run by hand, once, where `natten` and `torch` are installed (natten's na2d forward runs on
CPU); the file is committed so that the test suite never needs natten. Inputs come from a
fixed numpy seed, so re-running reproduces the same q, k, v (outputs to float rounding).

Layout in the file is NATTEN's, (B, H, W, heads, D), fp32. For each case `name`:
  {name}__q, {name}__k, {name}__v, {name}__out   (B, H, W, heads, D) float32
  {name}__kernel_size, {name}__scale             scalars
and `case_names` lists the names.
"""

from __future__ import annotations

import os

import numpy as np

# (height, width, kernel_size, batch, heads, head_dim, scale multiplier of D**-0.5)
CASES = (
    (7, 7, 7, 2, 2, 8, 1.0),     # window is the whole map: plain attention
    (13, 13, 7, 1, 2, 16, 1.0),  # interior and shifted border windows
    (16, 16, 7, 1, 2, 32, 0.5),  # even map size, non-default scale
    (13, 16, 5, 2, 1, 16, 1.0),  # non-square
    (8, 11, 3, 2, 3, 8, 2.0),    # small kernel, non-square, sharp softmax
    (6, 6, 5, 1, 4, 32, 1.0),    # kernel almost the map
    (5, 9, 5, 1, 2, 8, 1.0),     # kernel == height: only columns slide
)

SEED = 20250518
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'natten_na2d.npz')


def case_name(height: int, width: int, kernel_size: int) -> str:
  return f'{height}x{width}_k{kernel_size}'


def main() -> None:
  import torch
  import natten

  rng = np.random.default_rng(SEED)
  arrays = {}
  names = []
  for height, width, kernel_size, batch, heads, head_dim, scale_mult in CASES:
    name = case_name(height, width, kernel_size)
    shape = (batch, height, width, heads, head_dim)
    q_BHWhD, k_BHWhD, v_BHWhD = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    scale = float(np.float32(scale_mult * head_dim ** -0.5))
    with torch.no_grad():
      out = natten.na2d(torch.from_numpy(q_BHWhD), torch.from_numpy(k_BHWhD),
                        torch.from_numpy(v_BHWhD), kernel_size=kernel_size, dilation=1,
                        scale=scale)
    out_BHWhD = out.float().numpy()
    assert out_BHWhD.shape == shape, (name, out_BHWhD.shape)
    assert np.isfinite(out_BHWhD).all(), name
    arrays.update({
        f'{name}__q': q_BHWhD, f'{name}__k': k_BHWhD, f'{name}__v': v_BHWhD,
        f'{name}__out': out_BHWhD,
        f'{name}__kernel_size': np.int32(kernel_size), f'{name}__scale': np.float32(scale),
    })
    names.append(name)
  arrays['case_names'] = np.array(names)
  os.makedirs(os.path.dirname(PATH), exist_ok=True)
  np.savez_compressed(PATH, **arrays)
  print(f'natten {natten.__version__}: wrote {len(names)} cases to {PATH} '
        f'({os.path.getsize(PATH) / 1024:.0f} KiB)')


if __name__ == '__main__':
  main()
