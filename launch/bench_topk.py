r"""The sampler's top-k/top-p threshold at the largest scale: `lax.top_k` against value sorts.

  python launch/bench_topk.py                 # rows 8192 (batch 32 x 16x16), V 4096, k 900
  python launch/bench_topk.py --rows=64 --reps=3

Each variant returns the k largest logits of every row in descending order (what
`sampling.kept_threshold` scans); all must agree exactly. Median ms of --reps calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def variants(k: int):
  return {
      'lax.top_k (current)': lambda x: jax.lax.top_k(x, k)[0],
      'sort values, slice': lambda x: jnp.flip(jnp.sort(x, axis=-1)[:, -k:], -1),
      'sort negated, slice': lambda x: -jnp.sort(-x, axis=-1)[:, :k],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--rows', type=int, default=8192)
  p.add_argument('--vocab', type=int, default=4096)
  p.add_argument('--k', type=int, default=900)
  p.add_argument('--reps', type=int, default=20)
  args = p.parse_args(argv)
  x = jax.random.normal(jax.random.key(0), (args.rows, args.vocab), jnp.float32) * 3
  ref = None
  print(f'# {jax.devices()[0].device_kind}: rows {args.rows}, V {args.vocab}, k {args.k}')
  for name, fn in variants(args.k).items():
    f = jax.jit(fn)
    out = np.asarray(f(x))
    if ref is None:
      ref = out
    ok = np.array_equal(out, ref)
    times = []
    for _ in range(args.reps):
      t = time.perf_counter()
      f(x).block_until_ready()
      times.append(time.perf_counter() - t)
    print(f'{name:<24}{statistics.median(times) * 1e3:9.3f} ms   equal: {ok}')


if __name__ == '__main__':
  main()
