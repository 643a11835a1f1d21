"""Per-program XLA:CPU options: the probe for whether this jaxlib knows one, and the VQ-VAE's.

The sampler (`sampling.compiler_options`, `sampling.cpu_split`) and the training step
(`train.step_compiler_options`) keep their option sets beside the code they were measured
on; they all go through `options_if_known`, since the options are experimental and a
jaxlib may not know them.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

# The VQ-VAE's encoder and decoder are 3x3 convolutions. With XLA:CPU's defaults YNNPACK
# takes them, and ran them on one core here (80 GF/s); with YNNPACK's fusions limited to
# matmuls they go to Eigen's multi-threaded convolutions (142 GF/s) and XLA fuses the rest.
# d16 tokenizer, 2 images of 256 px, 2-core AMD EPYC, interleaved (launch/results/
# cpu_2026-11-28.md).
_VQVAE_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


def options_if_known(options: dict) -> tuple:
  """`options` as sorted items if this XLA:CPU accepts them, else () (its defaults).

  A one-op program is compiled with them once per process to find out.
  """
  return _accepts(tuple(sorted(options.items())))


@functools.lru_cache(maxsize=None)
def _accepts(items: tuple) -> tuple:
  try:
    jax.jit(lambda x: x + 1, backend='cpu').lower(np.float32(0)).compile(dict(items))
  except Exception:  # jaxlib without the option: compile with its defaults
    return ()
  return items


def on_cpu(options: dict, backend: str | None = None) -> tuple:
  """`options` as items where `backend` (default: JAX's) is a CPU whose XLA knows them;
  () elsewhere (other backends compile with their defaults)."""
  if (backend or jax.default_backend()) != 'cpu':
    return ()
  return options_if_known(options)


def vqvae_options(backend: str | None = None) -> dict | None:
  """`compiler_options` for a jit of the VQ-VAE alone (encode, decode) on `backend` (default:
  JAX's): `_VQVAE_CPU_OPTIONS` on an XLA:CPU that knows them, else None (XLA's defaults)."""
  return dict(on_cpu(_VQVAE_CPU_OPTIONS, backend)) or None


def ynn_fusions(hlo_text: str) -> dict:
  """{fusion name: its fused computation's text} for the YNNPACK fusions of a compiled
  XLA:CPU program's HLO (`compiled.as_text()`): what XLA handed to YNNPACK."""
  bodies, name = {}, None
  for line in hlo_text.splitlines():
    if line.rstrip().endswith('{') and not line.startswith(' '):  # a computation's header
      name = line.split()[0].lstrip('%')
      bodies[name] = ''
    elif name is not None:
      bodies[name] += line + '\n'
  out = {}
  for line in hlo_text.splitlines():
    if '__ynn_fusion' in line and 'calls=' in line:
      called = line.split('calls=')[1].split(',')[0].lstrip('%')
      out[line.split('=')[0].strip().lstrip('%')] = bodies.get(called, '')
  return out
