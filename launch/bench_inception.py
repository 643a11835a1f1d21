"""Throughput of the FID Inception feature extraction, and what 50k images cost.

    python launch/bench_inception.py --per_device_batch=128 --precisions=highest,default  # GPU
    python launch/bench_inception.py --per_device_batch=8 --reps=3                          # CPU

Prints one table: images/s of the sharded extractor (uint8 256 px in, all three outputs back
on the host) over every local device, the achieved TFLOP/s from XLA's cost analysis of one
image, and the seconds 60k images (ADM's 50k samples plus its 10k reference images) take at
that rate. Weights are random (throughput does not depend on them). Times are medians over
--reps calls after one warm-up call (which compiles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mvar_jax.evaluation import features, inception  # noqa: E402


def flops_per_image(config: inception.InceptionConfig, size: int) -> float:
  net = inception.FIDInception(config)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
  return float(jax.jit(net.apply).lower({'params': inception.abstract_params()}, x)
               .cost_analysis()['flops'])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--per_device_batch', type=int, default=64)
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--precisions', default='highest')
  p.add_argument('--reps', type=int, default=5)
  args = p.parse_args(argv)

  params = inception.random_params(0)
  rows = []
  for precision in args.precisions.split(','):
    cfg = inception.InceptionConfig(precision=precision)
    ex = features.FeatureExtractor(params, cfg, per_device_batch=args.per_device_batch)
    images = np.random.default_rng(0).integers(
        0, 256, (ex.global_batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    ex.of_array(images, progress=False)  # compile
    times = []
    for _ in range(args.reps):
      t = time.perf_counter()
      ex.of_array(images, progress=False)
      times.append(time.perf_counter() - t)
    ips = ex.global_batch / statistics.median(times)
    flops = flops_per_image(cfg, args.image_size)
    rows.append((precision, ex.global_batch, ips, ips * flops / 1e12, 60_000 / ips))
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'{flops_per_image(inception.InceptionConfig(), args.image_size) / 1e9:.2f} GFLOP/image '
        f'at {args.image_size} px (resized to 299)')
  print(f'{"precision":<10} {"batch":>6} {"images/s":>10} {"TFLOP/s":>9} {"60k images (s)":>15}')
  for r in rows:
    print(f'{r[0]:<10} {r[1]:>6} {r[2]:>10.2f} {r[3]:>9.3f} {r[4]:>15.1f}')


if __name__ == '__main__':
  main()
