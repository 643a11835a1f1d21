"""XLA:CPU option sets for our programs, side by side (CPU only).

    python launch/bench_cpu_options.py                         # the conv nets, ~10 min on 2 cores
    python launch/bench_cpu_options.py --programs=scale0,scale1,scale2 --sequences=64

Each program is compiled four ways: XLA's defaults, YNNPACK for matmuls with their epilogues
(`xla_cpu.conv_net_options()`: the convolutions go to Eigen), YNNPACK for single matmuls (the
sampler's large scales, `sampling.cpu_split`), and no YNNPACK at all (the sampler's small
scales). They run interleaved after one warm-up call each; the table gives the median seconds
per call and the largest difference of any variant's outputs from the defaults'. Random
weights: the time does not depend on them.

  vqvae_encode / vqvae_decode: the d16 tokenizer (VAR's VQ-VAE), 2 images of 256 px.
  inception: FID Inception features of 16 images of 299 px.
  lpips: LPIPS (VGG16 trunk) of 16 pairs of 256 px images.
  judge: one training step of the class-consistency classifier (batch 64, 32 px).
  scaleK: one scale's forward of the d16 transformer for --sequences rows of tokens (with
    CFG a sampler of batch B runs 2B), unrolled blocks.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # smoke_configs

from mvar_jax import xla_cpu  # noqa: E402

_YNN = 'xla_cpu_experimental_ynn_fusion_type'
VARIANTS = {'XLA defaults': None,
            'matmuls': {_YNN: 'LIBRARY_FUSION_TYPE_DOT'},
            'single matmuls': {_YNN: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
            'no YNNPACK': {_YNN: ''}}


def _uniform(shape, lo=-1.0, hi=1.0, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, shape), jnp.float32)


def _vqvae(part: str):
  from mvar_jax import vqvae
  tok = vqvae.Tokenizer(vqvae.VQVAEConfig())
  params = vqvae.init_params(tok.config, jax.random.key(0, impl='unsafe_rbg'))['params']
  images = _uniform((2, 256, 256, 3))
  if part == 'encode':
    return tok.img_to_ids, (params, images)
  return tok.ids_to_img, (params, jax.jit(tok.img_to_ids)(params, images))


def _inception():
  from mvar_jax.evaluation import inception
  net = inception.FIDInception(inception.InceptionConfig())
  return (lambda p, x: net.apply({'params': p}, x),
          (inception.random_params(0), _uniform((16, 299, 299, 3), 0, 255)))


def _lpips():
  from mvar_jax import lpips
  model = lpips.LPIPS()
  return (lambda p, a, b: model.apply({'params': p}, a, b),
          (lpips.random_params(0)[0], _uniform((16, 256, 256, 3)),
           _uniform((16, 256, 256, 3), seed=1)))


def _judge():
  import optax
  from mvar_jax import class_consistency
  judge = class_consistency.ShapeClassifier(10)
  x, y = _uniform((64, 32, 32, 3)), jnp.arange(64, dtype=jnp.int32) % 10

  def step(p, x, y):  # the loss and its gradient, as class_consistency's step computes them
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(judge.apply(p, x), y).mean()
    return jax.value_and_grad(loss)(p)

  return step, (judge.init(jax.random.key(0), x[:1]), x, y)


def _scale(si: int, sequences: int):
  import smoke_configs
  from mvar_jax import transformer as tfm
  cfg = tfm.preset(16)
  params = smoke_configs.random_params(
      jax.eval_shape(lambda: tfm.init_params(cfg, jax.random.key(0)))['params'],
      np.random.default_rng(0))
  pn = cfg.layout.patch_nums[si]
  labels = jnp.arange(sequences, dtype=jnp.int32) % cfg.num_classes
  x = None if si == 0 else _uniform((sequences, pn * pn, cfg.cvae))
  model = tfm.MVARTransformer(cfg)
  return (lambda p, l, x: model.apply({'params': p}, l, x, first=si, last=si),
          (params, labels, x))


# {name: (sequences) -> (function, arguments)}: each function is jitted once per option set.
PROGRAMS = {'vqvae_encode': lambda _: _vqvae('encode'), 'vqvae_decode': lambda _: _vqvae('decode'),
            'inception': lambda _: _inception(), 'lpips': lambda _: _lpips(),
            'judge': lambda _: _judge(),
            **{f'scale{si}': functools.partial(_scale, si) for si in range(10)}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--programs', default='vqvae_encode,vqvae_decode,inception,lpips,judge',
                 help=f'from {",".join(PROGRAMS)}')
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--sequences', type=int, default=4, help='rows of tokens for scaleK')
  args = p.parse_args(argv)
  if jax.default_backend() != 'cpu':
    sys.exit('these are XLA:CPU options: run on a CPU backend (JAX_PLATFORMS=cpu)')
  names = args.programs.split(',')
  unknown = sorted(set(names) - set(PROGRAMS))
  if unknown:
    sys.exit(f'unknown programs {unknown}; choose from {sorted(PROGRAMS)}')
  variants = {n: o for n, o in VARIANTS.items() if o is None or xla_cpu.options_if_known(o)}
  if len(variants) < len(VARIANTS):
    sys.exit(f'this XLA:CPU (jax {jax.__version__}) does not know the option {_YNN}')
  print(f'{jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}; '
        f'median of {args.reps} interleaved calls, s')
  print('| program | ' + ' | '.join(variants) + ' | max |diff| |')
  print('|---' * (len(variants) + 2) + '|')
  rows = []
  for name in names:
    fn, fn_args = PROGRAMS[name](args.sequences)
    jits = {v: jax.jit(fn, compiler_options=o) for v, o in variants.items()}
    outs = {v: jax.block_until_ready(f(*fn_args)) for v, f in jits.items()}  # compile, warm up
    ref = jax.tree_util.tree_leaves(outs['XLA defaults'])
    diff = max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
               for v in variants for a, b in zip(jax.tree_util.tree_leaves(outs[v]), ref))
    times = {v: [] for v in jits}
    for _ in range(args.reps):
      for v, f in jits.items():
        t = time.perf_counter()
        jax.block_until_ready(f(*fn_args))
        times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    print(f'| {name} | ' + ' | '.join(f'{m:.3f}' for m in med.values())
          + f' | {diff:.1e} |', flush=True)
    rows.append((name, med, diff))
  return rows


if __name__ == '__main__':
  main()
