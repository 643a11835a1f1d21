"""The stand-in natten.na2d that bench_vs_official.py gives the official MVAR without NATTEN.

Checked against NATTEN's own outputs recorded in tests/fixtures/natten_na2d.npz (so this
file needs only torch), in NATTEN's layout (B, H, W, heads, D).
"""

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'natten_na2d.npz')


def _load_fallback():
  spec = importlib.util.spec_from_file_location('natten_fallback',
                                                os.path.join(ROOT, 'launch', 'natten_fallback.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


fallback = _load_fallback()


def _cases():
  with np.load(FIXTURES) as data:
    return [str(n) for n in data['case_names']]


@pytest.mark.parametrize('kind', ['sdpa', 'flex', 'auto'])
@pytest.mark.parametrize('case', _cases())
def test_matches_natten_outputs(kind, case):
  with np.load(FIXTURES) as data:
    q, k, v, want = (torch.from_numpy(data[f'{case}__{x}']) for x in ('q', 'k', 'v', 'out'))
    kernel_size = int(data[f'{case}__kernel_size'])
    scale = float(data[f'{case}__scale'])
  fn = {'sdpa': fallback.na2d_sdpa, 'flex': fallback.na2d_flex, 'auto': fallback.na2d_auto}[kind]
  # The official call: na2d(q, k, v, kernel_size=k, dilation=1, scale=s).
  got = fn(q, k, v, kernel_size=kernel_size, dilation=1, scale=scale)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)


def test_mask_has_k_squared_keys_per_query_shifted_at_borders():
  mask = fallback.neighborhood_mask(9, 6, 5)
  assert mask.shape == (54, 54)
  assert torch.all(mask.sum(-1) == 25)
  # Query (0, 0) sees rows 0..4, cols 0..4; query (8, 5) rows 4..8, cols 1..5.
  grid = mask.reshape(9, 6, 9, 6)
  assert torch.equal(torch.nonzero(grid[0, 0]).min(0).values, torch.tensor([0, 0]))
  assert torch.equal(torch.nonzero(grid[8, 5]).min(0).values, torch.tensor([4, 1]))


def test_unsupported_arguments_are_refused():
  x = torch.zeros(1, 5, 5, 1, 4)
  with pytest.raises(NotImplementedError, match='dilation 1'):
    fallback.na2d_sdpa(x, x, x, kernel_size=3, dilation=2)
  with pytest.raises(ValueError, match=r'expects \(B, H, W, heads, D\)'):
    fallback.na2d_sdpa(x[0], x[0], x[0], kernel_size=3)
  with pytest.raises(ValueError, match="must be one of \\('auto', 'sdpa', 'flex'\\), got 'cuda'"):
    fallback.install('cuda')


def test_install_provides_a_natten_module_when_the_real_one_is_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, 'natten', None)  # `import natten` now raises ImportError
  label = fallback.install('sdpa')
  assert label == 'na2d via torch SDPA+mask, natten unavailable'
  from natten import na2d
  assert na2d is fallback.na2d_sdpa
