"""Which forms of a layer's bias and GELU XLA folds into the cuBLAS GEMM, and their cost.

On a GPU, XLA's GEMM rewriter can move a vector bias (epilogue BIAS) and the tanh GELU
(BIAS_GELU) into a cuBLASLt call instead of a separate pass over the output. The sampler's
H100 profile showed the FFN's GELU and the attention's qkv bias as such passes (4.4 and 2.6
ms per d16 batch-32 call). This compiles small jitted layers in the forms the model could use,
under XLA option sets, and prints for each the epilogues in the optimised program, the number
of kernels, and the median time at the last scale's shape (64 maps x 256 tokens, bf16):

    python launch/check_gemm_epilogues.py [--tokens=16384] [--reps=20]

On CPU it runs too (no cuBLAS: the epilogue column is empty), which the smoke test uses.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fusions import per_call_ms  # noqa: E402  (launch/: the same timer)

OPTION_SETS = {'default': {}, 'no triton gemm': {'xla_gpu_enable_triton_gemm': False}}


def _gelu_f32_out(x, w, b):
  """fc1 accumulated and biased in fp32, GELU in fp32, rounded once to bf16."""
  y = jnp.dot(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
  return jax.nn.gelu(y, approximate=True).astype(x.dtype)


def forms(tokens: int, width: int, dtype):
  """name -> (fn, args): the layer forms compared."""
  key = iter(jax.random.split(jax.random.key(0), 8))
  x = jax.random.normal(next(key), (tokens, width), dtype)
  w1 = (jax.random.normal(next(key), (width, 4 * width)) * width ** -0.5).astype(dtype)
  b1 = jax.random.normal(next(key), (4 * width,), dtype)
  wq = (jax.random.normal(next(key), (width, 3 * width)) * width ** -0.5).astype(dtype)
  qb, vb = (jax.random.normal(next(key), (width,), dtype) for _ in range(2))
  b3 = jnp.concatenate([qb, jnp.zeros_like(qb), vb])
  return {
      'fc1 + bias (no GELU)': (lambda x, w, b: jnp.dot(x, w) + b, (x, w1, b1)),
      'fc1 + bias + GELU (the model)': (
          lambda x, w, b: jax.nn.gelu(jnp.dot(x, w) + b, approximate=True), (x, w1, b1)),
      'fc1 fp32 out + bias + GELU, one rounding': (_gelu_f32_out, (x, w1, b1)),
      'fc1 + bias, GELU in fp32 of the bf16 output': (
          lambda x, w, b: jax.nn.gelu((jnp.dot(x, w) + b).astype(jnp.float32),
                                      approximate=True).astype(x.dtype), (x, w1, b1)),
      'qkv + concat(q_bias, 0, v_bias) (the model)': (
          lambda x, w, q, v: jnp.dot(x, w) + jnp.concatenate([q, jnp.zeros_like(q), v]),
          (x, wq, qb, vb)),
      'qkv + one (3C,) bias argument': (lambda x, w, b: jnp.dot(x, w) + b, (x, wq, b3)),
      'qkv, no bias': (lambda x, w: jnp.dot(x, w), (x, wq)),
  }


def epilogues(hlo: str) -> str:
  found = re.findall(r'"epilogue":"(\w+)"', hlo)
  return ','.join(sorted(set(found))) if found else '-'


def kernels(hlo: str) -> int:
  """Fusions and custom calls in the entry computation: the kernels one call launches."""
  entry = hlo[hlo.rfind('ENTRY'):]
  return len(re.findall(r'= [^=]*\b(?:fusion|custom-call)\(', entry))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--tokens', type=int, default=16384, help='rows: 64 maps x 256 tokens')
  p.add_argument('--width', type=int, default=1024)
  p.add_argument('--reps', type=int, default=20)
  p.add_argument('--smoke', action='store_true', help='tiny shapes, one option set')
  args = p.parse_args(argv)
  tokens, width = (64, 32) if args.smoke else (args.tokens, args.width)
  on_gpu = jax.default_backend() == 'gpu'
  option_sets = OPTION_SETS if on_gpu and not args.smoke else {'default': {}}
  print(f'# {jax.devices()[0].device_kind}, jax {jax.__version__}; x ({tokens}, {width}) bf16')
  print(f'{"form":<46}{"options":<16}{"epilogues":<22}{"kernels":>8}{"ms":>9}')
  rows = []
  for name, (fn, fargs) in forms(tokens, width, jnp.bfloat16).items():
    reference = None
    for opt_name, options in option_sets.items():
      compiled = jax.jit(fn).lower(*fargs).compile(compiler_options=options or None)
      hlo = compiled.as_text()
      out = np.asarray(compiled(*fargs), np.float32)
      reference = out if reference is None else reference
      if not np.allclose(out, reference, rtol=5e-2, atol=5e-2):
        raise AssertionError(f'{name} under {opt_name}: results differ from the default')
      ms = per_call_ms(compiled, *fargs, reps=3 if args.smoke else args.reps, inner=10)
      rows.append((name, opt_name, epilogues(hlo), kernels(hlo), ms))
      print(f'{name:<46}{opt_name:<16}{epilogues(hlo):<22}{kernels(hlo):>8}{ms:>9.3f}',
            flush=True)
  return rows


if __name__ == '__main__':
  main()
