"""Per-program XLA:CPU options: the probe for whether this jaxlib knows one, and the
convolutional networks' (the VQ-VAE, its discriminator, Inception, LPIPS, the class judge).

The sampler (`sampling.compiler_options`, `sampling.cpu_split`) and the training step
(`train.step_compiler_options`) keep their option sets beside the code they were measured
on; they all go through `options_if_known`, since the options are experimental and a
jaxlib may not know them.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

# Convolutional networks. With XLA:CPU's defaults YNNPACK takes their convolutions and ran them
# on one core here (80 GF/s in the VQ-VAE); with YNNPACK's fusions limited to matmuls they go
# to Eigen's multi-threaded convolutions (142 GF/s) and XLA fuses the rest. 2-core AMD EPYC,
# interleaved, same outputs, time against the defaults (launch/bench_cpu_options.py,
# launch/results/cpu_2026-11-28.md): d16 tokenizer on 2 images of 256 px, encode 0.59x and
# decode 0.75x; Inception (FID) on 16 images 0.50x; LPIPS 0.72x; the class judge's step 0.57x.
_CONV_NET_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


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


def conv_net_options(backend: str | None = None) -> dict | None:
  """`compiler_options` for a jit of a convolutional network (the VQ-VAE's encode or decode,
  Inception, LPIPS, ...) on `backend` (default: JAX's): `_CONV_NET_CPU_OPTIONS` on an XLA:CPU
  that knows them, else None (XLA's defaults)."""
  return dict(on_cpu(_CONV_NET_CPU_OPTIONS, backend)) or None


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
