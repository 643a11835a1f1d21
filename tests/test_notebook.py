"""notebooks/mvar_jax_colab.ipynb runs end to end (nbclient) against a tiny demo model.

No torch and no download: the demo model is trained for a few steps on the built-in shapes
(conftest's session fixture, shared with test_demo.py), and the notebook's evaluation cell
uses a randomly initialised Inception network.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'mvar_jax_colab.ipynb')


def _text(cell) -> str:
  return ''.join(o.get('text', '') for o in cell.get('outputs', []) if o.get('name') == 'stdout')


@pytest.mark.slow
def test_notebook_runs_every_cell(tiny_demo_run, monkeypatch):
  demo_workdir, _ = tiny_demo_run  # conftest: the tiny demo, trained once per session
  for name in ('MVAR_WEIGHTS', 'MVAR_INCEPTION', 'MVAR_JAX_DIR'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('MVAR_DEMO_WORKDIR', demo_workdir)
  monkeypatch.setenv('MVAR_EVAL_IMAGES', '8')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Runs from notebooks/, as a user who opened it in Jupyter; a failing cell raises here.
  NotebookClient(nb, timeout=900, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()

  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.get('execution_count') for c in code), 'a code cell did not run'
  out = '\n'.join(_text(c) for c in code)
  assert f'mvar-jax from {ROOT}' in out
  assert 'teacher-forced token accuracy' in out
  images = [o for c in code for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(images) == 2  # the sample grid and the samples beside their reconstructions
  table = _text(code[-1])
  for line in ('FID', 'sFID', 'Inception Score', 'Precision', 'Recall'):
    assert line in table
  counts = {line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in table.splitlines()
            if line.startswith(('images', 'reference images'))}
  assert counts == {'images': '8', 'reference images': '8'}
