"""Throughput of sampling and of a training step, VAR vs MVAR, on random weights.

    python launch/bench_model.py --depth=16 --batch_sizes=32,64 --impls=dense,pallas   # on a GPU
    python launch/bench_model.py --smoke                                                 # CPU check

Prints one table: images/s and ms per batch for sampling (cfg on, top-k/top-p on, KV-cache-free
MVAR vs VAR-mode prefix recomputation), ms per training step (all scales, bf16) and peak device
memory. Times are medians over --reps runs after --warmup runs, each fenced by
block_until_ready. Weights are random (throughput does not depend on them); the VQ-VAE is the
full 108.95M model so the decoder's cost is included.

Published anchors (MVAR_SPEC section 5, RTX 4090, batch 32, 256 px): VAR-d16 0.34 s/batch,
MVAR-d16 0.27 s/batch sampling; training 0.99 vs 0.61 s/it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smoke_configs  # noqa: E402  (launch/)


def _median_ms(fn, warmup: int, reps: int, what: str = '') -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())  # compiles
  print(f'  {what}: first call (compile + run) {time.perf_counter() - t:.1f} s', flush=True)
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times)


def _peak_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use', float('nan'))


def main(argv=None):
  from mvar_jax import sampling, transformer, vqvae
  from mvar_jax.attention import AttentionConfig

  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--depth', type=int, default=16)
  p.add_argument('--batch_sizes', default='32')
  p.add_argument('--impls', default='dense', help='neighbourhood implementations for MVAR rows')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--variants', default='var,mvar',
                 help="'var' and/or 'mvar': run one per process for a per-model peak memory")
  p.add_argument('--skip_train', action='store_true')
  p.add_argument('--skip_sample', action='store_true')
  p.add_argument('--bf16_params', action='store_true',
                 help='sample with a bf16 copy of the transformer params (sampling.inference_params)')
  p.add_argument('--decoder_dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='VQ-VAE decode dtype (VQVAEConfig.decoder_dtype)')
  p.add_argument('--loop_blocks', default='auto', choices=('auto', 'on', 'off'),
                 help="the sampler's blocks as a loop per scale (auto: sampling.loops_blocks)")
  p.add_argument('--smoke', action='store_true', help='tiny models on any backend')
  args = p.parse_args(argv)

  if args.smoke:
    v_cfg, base = smoke_configs.tiny(depth=2)
    args.warmup, args.reps = 1, 2
  else:
    v_cfg = vqvae.VQVAEConfig(precision='default', decoder_dtype=args.decoder_dtype)
    base = transformer.preset(args.depth, dtype='bfloat16')
  rng = jax.random.key(0, impl='unsafe_rbg')
  import flax.linen as nn
  v_params = nn.unbox(jax.jit(lambda r: vqvae.init_params(v_cfg, r))(rng)['params'])
  t_params = nn.unbox(jax.jit(lambda r: transformer.init_params(base, r))(rng)['params'])
  tok = vqvae.Tokenizer(v_cfg)

  rows = []
  wanted = set(args.variants.split(','))
  variants = [('VAR', AttentionConfig(mode='var'))] if 'var' in wanted else []
  for impl in args.impls.split(',') if 'mvar' in wanted else ():
    variants.append((f'MVAR/{impl}', dataclasses.replace(base.attention, implementation=impl)))
  for b in (int(x) for x in args.batch_sizes.split(',')):
    for name, attn in variants:
      cfg = dataclasses.replace(base, attention=attn)
      model = transformer.MVARTransformer(cfg)
      labels = jnp.arange(b, dtype=jnp.int32) % cfg.num_classes
      sample_params = sampling.inference_params(t_params) if args.bf16_params else t_params
      ms_sample, xla_gib = float('nan'), float('nan')
      if not args.skip_sample:
        try:
          # One executable gives both the time and the memory analysis (what the program
          # needs, free of the autotuning scratch that peak_bytes_in_use also counts).
          t = time.perf_counter()
          loop = {'auto': None, 'on': True, 'off': False}[args.loop_blocks]
          sampler = sampling.compile_sampler(model, sample_params, tok, v_params, batch_size=b,
                                             cfg=1.5, top_k=900, loop_blocks=loop)
          print(f'  {name} b{b} sampling: compile {time.perf_counter() - t:.1f} s', flush=True)
          xla_gib = _program_gib(sampler)
          key = jax.random.key(1)
          ms_sample = _median_ms(
              lambda: sampler(sample_params, v_params, key=key, labels=labels, cfg=1.5,
                              top_p=0.96).images_BHW3, args.warmup, args.reps,
              f'{name} b{b} sampling')
        except Exception as e:  # e.g. out of memory: report and go on
          print(f'{name} b{b} sampling failed: {type(e).__name__}: {str(e)[:200]}')
      ms_train = float('nan')
      if not args.skip_train:
        ms_train = _time_train_step(model, t_params, b, args)
      rows.append((name, b, ms_sample, b / ms_sample * 1e3, ms_train, _peak_bytes() / 2**30,
                   xla_gib))
      print(f'  {rows[-1]}', flush=True)

  dev = jax.devices()[0]
  print(f'\ndevice: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, depth {base.depth}')
  print(f"{'model':<14}{'batch':>6}{'sample ms':>12}{'img/s':>10}{'train ms':>11}{'peak GiB':>10}"
        f"{'sampler GiB':>13}")
  for name, b, ms, ips, tr, mem, xla in rows:
    print(f'{name:<14}{b:>6}{ms:>12.1f}{ips:>10.1f}{tr:>11.1f}{mem:>10.2f}{xla:>13.2f}')
  print('peak GiB: the allocator peak of the process (includes compile-time autotuning scratch);'
        ' sampler GiB: the compiled sampler\'s arguments + outputs + temporaries.')


def _program_gib(compiled) -> float:
  from bench_memory import program_memory
  mem = compiled.memory_analysis()
  if mem is None:
    return float('nan')
  return program_memory(mem).peak / 2**30


def _time_train_step(model, params, batch, args) -> float:
  cfg = model.config
  layout = cfg.layout
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95)
  opt_state = tx.init(params)
  x = jax.random.normal(jax.random.key(2), (batch, layout.total_len - 1, cfg.cvae))
  ids = jax.random.randint(jax.random.key(3), (batch, layout.total_len), 0, cfg.vocab_size)
  labels = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({'params': p}, labels, x, train=True,
                           rngs={'dropout': jax.random.key(4)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state = (params, opt_state)
  try:
    return _median_ms(lambda: step(*state)[0], args.warmup, args.reps, 'train step')
  except Exception as e:
    print(f'train step failed: {type(e).__name__}: {str(e)[:200]}')
    return float('nan')


if __name__ == '__main__':
  main()
