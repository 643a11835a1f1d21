"""pytorch-fid as a reference: importable beside a torchvision wheel built for CUDA torch."""

import importlib.util
import os

import pytest


def import_pytorch_fid():
  """pytorch_fid.inception, importable also beside a torchvision built for CUDA torch.

  The PyPI torchvision wheel's C ops do not load with the CPU torch build; torchvision then
  still registers fake kernels for two ops it assumes exist (nms, qnms) and fails to import.
  Declaring those two schemas first lets the pure-Python models import (no op is ever run).
  """
  import torch
  spec = importlib.util.find_spec('torchvision')
  if spec is None:
    pytest.fail('torchvision is a test dependency (requirements-test.txt)')
  try:
    torch.ops.load_library(os.path.join(spec.submodule_search_locations[0], '_C.so'))
  except (OSError, RuntimeError):
    if not hasattr(import_pytorch_fid, 'lib'):
      lib = torch.library.Library('torchvision', 'DEF')
      for op in ('nms', 'qnms'):
        lib.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
      import_pytorch_fid.lib = lib  # keep the registration alive
  from pytorch_fid import inception as pf
  return pf
