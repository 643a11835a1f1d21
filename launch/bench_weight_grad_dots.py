"""The rate of a dense layer's weight-gradient product, dW = x^T g, three ways.

    python launch/bench_weight_grad_dots.py            # d16 shapes at the scale-8/9 rows
    python launch/bench_weight_grad_dots.py --smoke    # tiny shapes: checks the script runs

x is (M, K) and g is (M, N): M = batch x tokens, (K, N) a layer's weight. Columns, GFLOP/s
(2 M K N per product, median of --reps):
- `xla dot_general`: what autodiff emits, a dot contracting x's rows (XLA:CPU: an Eigen dot);
- `xla transposed copy`: x^T materialised behind an optimisation barrier, then an ordinary
  GEMM (`mvar_jax.weight_grads`, what training uses when `transposed_weight_grads` is on);
- `torch`: `x.T @ g`, for scale (skipped when torch is not installed).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_sampler import median_ms  # noqa: E402  (launch/)

# (K, N) of the d16 layers whose weight gradients contract K = 1024 rows, and fc2's.
D16_WEIGHTS = {'qkv': (1024, 3072), 'proj': (1024, 1024), 'fc1': (1024, 4096),
               'fc2': (4096, 1024), 'head': (1024, 4096)}


def contenders():
  autodiff = jax.jit(lambda x, g: lax.dot_general(x, g, (((0,), (0,)), ((), ()))))
  transposed = jax.jit(lambda x, g: lax.optimization_barrier(x.T) @ g)
  return {'xla dot_general': autodiff, 'xla transposed copy': transposed}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--rows', default='338,512', help='M values: batch x tokens (d16 batch 2: '
                 'scale 8 = 338, scale 9 = 512)')
  p.add_argument('--reps', type=int, default=9)
  p.add_argument('--smoke', action='store_true')
  args = p.parse_args(argv)
  weights = D16_WEIGHTS
  rows = [int(m) for m in args.rows.split(',')]
  if args.smoke:
    weights, rows, args.reps = {'tiny': (32, 48)}, [16], 2
  try:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
  except ImportError:
    torch = None
  fns = contenders()
  names = list(fns) + (['torch'] if torch else [])
  dev = jax.devices()[0]
  print(f'# {dev.device_kind} ({dev.platform}), jax {jax.__version__}, fp32, GFLOP/s, '
        f'median of {args.reps}')
  print('| M | layer (K x N) | ' + ' | '.join(names) + ' | transposed / dot_general |')
  print('|---' * (len(names) + 3) + '|')
  out = []
  rng = np.random.default_rng(0)
  for m in rows:
    for layer, (k, n) in weights.items():
      x = rng.standard_normal((m, k), np.float32)
      g = rng.standard_normal((m, n), np.float32)
      flop = 2 * m * k * n
      rate = {name: flop / median_ms(fn, jnp.asarray(x), jnp.asarray(g), reps=args.reps) / 1e6
              for name, fn in fns.items()}
      np.testing.assert_allclose(fns['xla transposed copy'](x, g), fns['xla dot_general'](x, g),
                                 rtol=1e-4, atol=1e-3 * np.sqrt(m))
      if torch:
        tx, tg = torch.from_numpy(x), torch.from_numpy(g)
        rate['torch'] = flop / median_ms(lambda a, b: a.T @ b, tx, tg, reps=args.reps) / 1e6
      speedup = rate['xla transposed copy'] / rate['xla dot_general']
      print(f'| {m} | {layer} ({k} x {n}) | ' + ' | '.join(f'{rate[c]:.0f}' for c in names)
            + f' | {speedup:.2f} |', flush=True)
      out.append((m, layer, rate))
  return out


if __name__ == '__main__':
  main()
