"""The benchmark scripts in launch/: the pieces that need neither a GPU nor the official code."""

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  sys.path.insert(0, os.path.join(ROOT, 'launch'))
  try:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'launch', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(os.path.join(ROOT, 'launch'))


def _fake_checkout(path, tag):
  """A checkout shaped like the official ones: top-level `models` and `utils` packages."""
  (path / 'models').mkdir(parents=True)
  (path / 'utils').mkdir()
  (path / 'utils' / '__init__.py').write_text(f'TAG = {tag!r}\n')
  (path / 'models' / '__init__.py').write_text(
      'from utils import TAG\n'
      'def build():\n'
      '  from utils import TAG as late  # resolved when called, as the official builders do\n'
      '  return TAG, late\n')
  return str(path)


def test_two_checkouts_with_the_same_package_names_import_side_by_side(tmp_path):
  bench = _load('bench_vs_official')
  before = {k for k in sys.modules if k.split('.')[0] in ('models', 'utils')}
  mvar = bench.import_official(_fake_checkout(tmp_path / 'MVAR', 'mvar'))
  var = bench.import_official(_fake_checkout(tmp_path / 'VAR', 'var'))
  assert mvar.TAG == 'mvar' and var.TAG == 'var'
  assert {k for k in sys.modules if k.split('.')[0] in ('models', 'utils')} == before
  with pytest.raises(SystemExit, match='has no models/ package'):
    bench.import_official(str(tmp_path))


def test_the_official_vqvae_is_filled_deterministically():
  bench = _load('bench_vs_official')
  vae = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8),
                            torch.nn.Embedding(16, 4))
  for p in vae.parameters():
    torch.nn.init.constant_(p, float('nan'))  # what torch.empty may hold
  bench.fill_vqvae_(vae, seed=3)
  first = [p.clone() for p in vae.parameters()]
  assert all(torch.isfinite(p).all() for p in first)
  assert torch.all(vae[1].weight == 1) and torch.all(vae[0].bias == 0)
  assert vae[2].weight.abs().max() <= 1 / 16
  bench.fill_vqvae_(vae, seed=3)
  assert all(torch.equal(a, b) for a, b in zip(first, vae.parameters()))


def test_bench_memory_smoke_prints_the_table(capsys):
  bench = _load('bench_memory')
  bench.main(['--smoke', '--skip_parts'])
  out = capsys.readouterr().out
  assert 'MVAR-d1' in out and 'VAR-d1' in out and 'VAR / MVAR sampling peak' in out
