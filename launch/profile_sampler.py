r"""Per-stage times of one sampling pass (random weights), to see where the loop's time goes.

  python launch/profile_sampler.py --depth=16 --batch=2          # CPU: ~5 min on 2 cores
  python launch/profile_sampler.py --smoke

Each stage of each scale is jitted and timed on its own (median of --reps, after a warm-up):
the transformer forward on the CFG-doubled batch, guidance + top-k/top-p filtering, the
categorical draw, the VQ-VAE's next-input step, and at the end the decode to images. The sum
is close to, but not exactly, the fused sampler's time (XLA fuses across stage borders there).
For a trace instead, wrap `sampling.sample` in `jax.profiler.trace(dir)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import smoke_configs  # noqa: E402  (launch/)


def median_ms(fn, *args, reps: int):
  """Median wall time of fn(*args) in ms over `reps` calls, after one untimed call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def main(argv=None):
  from mvar_jax import sampling, transformer as tfm, vqvae
  from mvar_jax.attention import AttentionConfig

  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--depth', type=int, default=16)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--top_k', type=int, default=900)
  p.add_argument('--top_p', type=float, default=0.96)
  p.add_argument('--implementation', default='auto', help='neighbourhood op')
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--smoke', action='store_true')
  args = p.parse_args(argv)

  if args.smoke:
    v_cfg, t_cfg = smoke_configs.tiny(depth=1)
    args.top_k, args.reps = smoke_configs.TOP_K, 1
  else:
    v_cfg = vqvae.VQVAEConfig()
    t_cfg = tfm.preset(args.depth)
  t_cfg = dataclasses.replace(t_cfg, attention=dataclasses.replace(
      t_cfg.attention, implementation=args.implementation))
  rng = np.random.default_rng(0)
  fill = lambda tree: smoke_configs.random_params(tree, rng)
  v_params = fill(jax.eval_shape(lambda: vqvae.init_params(v_cfg, jax.random.key(0)))['params'])
  t_params = fill(jax.eval_shape(lambda: tfm.init_params(t_cfg, jax.random.key(0)))['params'])
  tok, model = vqvae.Tokenizer(v_cfg), tfm.MVARTransformer(t_cfg)
  b = args.batch
  labels2 = jnp.arange(2 * b, dtype=jnp.int32) % t_cfg.num_classes
  layout = t_cfg.layout
  rows = []
  f_hat = jnp.zeros((b, layout.patch_nums[-1], layout.patch_nums[-1], t_cfg.cvae))
  for si, pn in enumerate(layout.patch_nums):
    x = None if si == 0 else jnp.asarray(
        rng.standard_normal((2 * b, pn * pn, t_cfg.cvae)), jnp.float32)
    fwd = jax.jit(lambda p, l, x, si=si: model.apply({'params': p}, l, x, first=si, last=si))
    logits = fwd(t_params, labels2, x)
    filt = jax.jit(lambda lg: sampling.top_k_top_p_filter(
        sampling.guidance(lg, 1.0), top_k=args.top_k, top_p=args.top_p))
    guided = filt(logits)
    draw = jax.jit(lambda k, lg: jax.random.categorical(k, lg, axis=-1))
    idx = draw(jax.random.key(si), guided)
    h = tok.codebook(v_params)[idx].reshape(b, pn, pn, -1)
    step = jax.jit(lambda v, f, h, si=si: tok.next_input(v, si, f, h))
    rows.append((f'scale {si} ({pn}x{pn})',
                 median_ms(fwd, t_params, labels2, x, reps=args.reps),
                 median_ms(filt, logits, reps=args.reps),
                 median_ms(draw, jax.random.key(si), guided, reps=args.reps),
                 median_ms(step, v_params, f_hat, h, reps=args.reps)))
    print(f'# {rows[-1][0]} done', flush=True)
  decode = jax.jit(lambda v, f: sampling.decode_in_chunks(tok, v, f,
                                                          sampling.DEFAULT_DECODE_BATCH))
  dec_ms = median_ms(decode, v_params, f_hat, reps=args.reps)

  dev = jax.devices()[0]
  print(f'\n# jax {jax.__version__} on {dev.platform}; depth {t_cfg.depth}, batch {b} (CFG: '
        f'{2 * b} rows), top-k {args.top_k}, neighbourhood op {args.implementation}; '
        f'median ms of {args.reps}')
  print(f'{"stage":<18}{"transformer":>12}{"filter":>9}{"draw":>8}{"next in":>9}')
  for name, *ms in rows:
    print(f'{name:<18}' + ''.join(f'{m:>{w}.1f}' for m, w in zip(ms, (12, 9, 8, 9))))
  tot = [sum(r[i] for r in rows) for i in range(1, 5)]
  print(f'{"total":<18}' + ''.join(f'{m:>{w}.1f}' for m, w in zip(tot, (12, 9, 8, 9))))
  print(f'VQ-VAE decode of {b} images: {dec_ms:.1f} ms; all stages: {sum(tot) + dec_ms:.1f} ms')


if __name__ == '__main__':
  main()
