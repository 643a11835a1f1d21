"""Our training step per segment with one backward setting off and on, interleaved.

    python launch/bench_train_step.py --depth=16 --batch=2                  # CPU (fp32)
    python launch/bench_train_step.py --depth=16 --batch=2 --field=transposed_weight_grads
    python launch/bench_train_step.py --depth=16 --batch=32 --dtype=bfloat16  # a GPU
    python launch/bench_train_step.py --smoke                               # any backend

One step = loss, gradient and AdamW on one segment of the official schedule (scales
0..refine_step-1, then each large scale alone; `--modes=var` adds VAR's all-scales step), on
random weights and data; each setting's training state is carried from step to step and
donated, and the step compiles with the XLA options, as in the trainer
(`train.step_compiler_options`). Every repetition runs each setting of `--field` (a
`TransformerConfig` field: `grad_boundaries` by default, or `transposed_weight_grads`) once,
in turn, the other field at its default; the table gives medians (ms) and the ratio on/off,
plus the largest fusion of each compiled step (instructions), the figure that grows with
depth when XLA duplicates the residual stream's cotangent chain.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def largest_fusion(hlo_text: str) -> int:
  """Instructions in the largest fused computation of an optimised HLO module."""
  sizes, current = [], None
  for line in hlo_text.splitlines():
    if re.match(r'^(%?[\w.\-]*fus[\w.\-]*) ', line) and line.rstrip().endswith('{'):
      current = 0
    elif current is not None and line.startswith('}'):
      sizes.append(current)
      current = None
    elif current is not None and '=' in line:
      current += 1
  return max(sizes, default=0)


@dataclasses.dataclass
class Row:
  label: str  # e.g. 'MVAR scales 0..7'
  ms: dict  # {setting: median ms}
  fusion: dict  # {setting: instructions in the largest fusion}
  loss_equal: bool  # every setting's loss within 1e-4 of the first's


def make_step(cfg, params, batch: int, first: int, last: int):
  """A compiled step (params, opt_state) -> (params, opt_state, loss) on segment first..last,
  its state donated as in the trainer; also returns a fresh AdamW state."""
  from mvar_jax import transformer as tfm
  model = tfm.MVARTransformer(cfg)
  layout = cfg.layout
  lo, hi = layout.span(first, last)
  first_l = layout.patch_nums[0] ** 2
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, layout.total_len - first_l, cfg.cvae)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, layout.total_len)), jnp.int32)
  labels = jnp.asarray(rng.integers(0, cfg.num_classes, (batch,)), jnp.int32)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)

  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({'params': p}, labels, x[:, max(0, lo - first_l):hi - first_l],
                           first=first, last=last, train=True,
                           rngs={'dropout': jax.random.key(1)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, lo:hi]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  from mvar_jax import train  # the trainer's XLA options for its step
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state).compile(
      dict(train.step_compiler_options()) or None)
  return compiled, opt_state


def main(argv=None):
  from mvar_jax import train, transformer as tfm
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--depth', type=int, default=16)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--modes', default='mvar', help="'mvar' (its segments) and/or 'var'")
  p.add_argument('--field', default='grad_boundaries',
                 choices=('grad_boundaries', 'transposed_weight_grads'),
                 help='the TransformerConfig setting to compare')
  p.add_argument('--settings', default='off,on', help="the field's values to compare")
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--smoke', action='store_true', help='a tiny model: checks the script runs')
  args = p.parse_args(argv)

  if args.smoke:
    import smoke_configs
    _, base = smoke_configs.tiny(depth=2)
    args.batch, args.reps, args.warmup = 2, 2, 0
  else:
    base = tfm.preset(args.depth, dtype=args.dtype)
  settings = args.settings.split(',')
  import flax.linen as nn
  params = nn.unbox(tfm.init_params(base, jax.random.key(0))['params'])

  rows = []  # (label, {setting: compiled step})
  fresh_opt = {}  # {setting: a fresh AdamW state} (one per setting: 2.5 GB at d16)
  for mode in args.modes.split(','):
    cfg_mode = dataclasses.replace(base, attention=dataclasses.replace(base.attention, mode=mode))
    n, refine = cfg_mode.layout.num_scales, cfg_mode.attention.refine_step
    segs = train.segments('segments' if mode == 'mvar' else 'all', n, refine)
    for first, last in segs:
      label = f'{mode.upper()} ' + (f'scales {first}..{last}' if first != last else
                                    f'scale {first}')
      steps = {}
      for s in settings:
        t = time.perf_counter()
        cfg = dataclasses.replace(cfg_mode, **{args.field: s})
        steps[s], opt_state = make_step(cfg, params, args.batch, first, last)
        fresh_opt.setdefault(s, opt_state)
        del opt_state
        print(f'# {label}, {args.field}={s}: compiled in {time.perf_counter() - t:.1f} s',
              flush=True)
      rows.append((label, steps))

  # One training state per setting, carried from step to step and donated, as the trainer
  # does (segments take turns on it); the first loss of each step is compared across settings.
  state = {s: (jax.tree_util.tree_map(jnp.copy, params), fresh_opt.pop(s)) for s in settings}
  del params
  times = {(label, s): [] for label, steps in rows for s in steps}
  losses = {}
  for rep in range(args.warmup + args.reps):
    for label, steps in rows:
      for s, compiled in steps.items():
        t = time.perf_counter()
        p, o, loss = compiled(*state[s])
        loss = float(jax.block_until_ready(loss))
        state[s] = (p, o)
        if rep >= args.warmup:
          times[(label, s)].append((time.perf_counter() - t) * 1e3)
        losses.setdefault((label, s), loss)

  dev = jax.devices()[0]
  print(f'\n# {dev.device_kind} ({dev.platform}), jax {jax.__version__}, depth {base.depth}, '
        f'batch {args.batch}, {base.dtype} compute, fp32 params; median of {args.reps} '
        f'interleaved reps after {args.warmup} warm-up; settings of {args.field}')
  head = ' | '.join(f'{s} ms | {s} fusion' for s in settings)
  print(f'| step | {head} | {settings[-1]} / {settings[0]} | loss equal |')
  print('|---' * (2 + 2 * len(settings) + 1) + '|')
  out = []
  for label, steps in rows:
    ref = losses[(label, settings[0])]
    row = Row(label, ms={s: statistics.median(times[(label, s)]) for s in steps},
              fusion={s: largest_fusion(steps[s].as_text()) for s in steps},
              loss_equal=all(abs(losses[(label, s)] - ref) <= 1e-4 * max(1.0, abs(ref))
                             for s in settings))
    cells = ' | '.join(f'{row.ms[s]:.1f} | {row.fusion[s]}' for s in settings)
    print(f'| {label} | {cells} | {row.ms[settings[-1]] / row.ms[settings[0]]:.2f} '
          f'| {row.loss_equal} |')
    out.append(row)
  print('fusion: instructions in the largest fused computation of the compiled step.')
  return out


if __name__ == '__main__':
  main()
