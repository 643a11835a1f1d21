r"""How long the first sampling call of a new process takes, stage by stage, with a warm cache.

  python launch/bench_first_call.py --depth=16 --batch=2 --runs=3    # CPU: ~10 min on 2 cores
  python launch/bench_first_call.py --smoke

Each run starts a fresh Python process twice on one empty persistent compilation cache: the
first fills it, the second is what a user sees every later time. In each process the first
`sampling.sample` call is split into the stages JAX reports (tracing to a jaxpr, lowering to
StableHLO, the cache lookup and executable load; a compile where the cache missed) and the
rest (the first execution: allocations, thread pools); steady calls follow. Prints medians
over the runs, the ratio first / steady of the second process (the issue's goal: <= 1.5) and
the load average, since on a shared machine it moves every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = (('trace', '/jax/core/compile/jaxpr_trace_duration'),
          ('lower', '/jax/core/compile/jaxpr_to_mlir_module_duration'),
          ('cache load', '/jax/compilation_cache/cache_retrieval_time_sec'),
          ('compile', '/jax/core/compile/backend_compile_duration'))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--depth', type=int, default=16)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--runs', type=int, default=3, help='pairs of processes; medians over them')
  p.add_argument('--steady', type=int, default=2, help='steady calls after the first')
  p.add_argument('--loop_blocks', default='auto', choices=('auto', 'on', 'off'),
                 help="the sampler's blocks as a loop per scale (auto: sampling.loops_blocks, "
                      'on for CPU); off/on give the A/B of the two program forms')
  p.add_argument('--smoke', action='store_true')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def child(args) -> dict:
  """One process: build, sample once (timed by stage), then steady calls. Returns seconds."""
  t_start = time.perf_counter()
  import jax
  import numpy as np
  import smoke_configs  # (launch/)
  from mvar_jax import compilation_cache, sampling, transformer as tfm, vqvae
  compilation_cache.enable()  # the directory comes from $MVAR_COMPILATION_CACHE_DIR
  durations = {}
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: durations.__setitem__(name, durations.get(name, 0.0) + secs))
  if args.smoke:
    v_cfg, t_cfg = smoke_configs.tiny(depth=1)
    top_k = smoke_configs.TOP_K
  else:
    v_cfg, t_cfg, top_k = vqvae.VQVAEConfig(), tfm.preset(args.depth), 900
  t_import = time.perf_counter()
  rng = np.random.default_rng(0)
  fill = lambda tree: smoke_configs.random_params(tree, rng)
  v_params = fill(jax.eval_shape(lambda: vqvae.init_params(v_cfg, jax.random.key(0)))['params'])
  t_params = fill(jax.eval_shape(lambda: tfm.init_params(t_cfg, jax.random.key(0)))['params'])
  jax.block_until_ready((v_params, t_params))
  tok, model = vqvae.Tokenizer(v_cfg), tfm.MVARTransformer(t_cfg)
  labels = np.arange(args.batch) % t_cfg.num_classes
  t_weights = time.perf_counter()

  def call():
    out = sampling.sample(model, t_params, tok, v_params, key=jax.random.key(1), labels=labels,
                          cfg=1.5, top_k=top_k, top_p=0.96,
                          loop_blocks={'auto': None, 'on': True, 'off': False}[args.loop_blocks])
    return jax.block_until_ready(out.images_BHW3)

  durations.clear()
  t, c = time.perf_counter(), time.process_time()
  call()
  first, first_cpu = time.perf_counter() - t, time.process_time() - c
  stages = {name: durations.get(event, 0.0) for name, event in STAGES}
  steady, steady_cpu = [], []
  for _ in range(args.steady):
    t, c = time.perf_counter(), time.process_time()
    call()
    steady.append(time.perf_counter() - t)
    steady_cpu.append(time.process_time() - c)
  return {'startup': t_import - t_start, 'weights': t_weights - t_import, 'first': first,
          'steady': statistics.median(steady), 'first cpu': first_cpu,
          'steady cpu': statistics.median(steady_cpu), **stages}


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    print(json.dumps(child(args)))
    return
  if args.smoke:
    args.runs, args.steady = 1, 1
  script = os.path.abspath(__file__)
  child_argv = [sys.executable, script, '--child', f'--depth={args.depth}',
                f'--batch={args.batch}', f'--steady={args.steady}',
                f'--loop_blocks={args.loop_blocks}'] + (
                    ['--smoke'] if args.smoke else [])
  results = {'first process': [], 'second process': []}
  loads = [os.getloadavg()[0]]
  for _ in range(args.runs):
    with tempfile.TemporaryDirectory() as cache:
      env = dict(os.environ, MVAR_COMPILATION_CACHE_DIR=cache)
      for which in results:
        out = subprocess.run(child_argv, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
          sys.exit(f'{which} failed:\n{out.stderr[-3000:]}')
        results[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
        loads.append(os.getloadavg()[0])
        print(f'# {which}: {results[which][-1]}', flush=True)

  cols = ('startup', 'weights', 'trace', 'lower', 'cache load', 'compile', 'first', 'steady',
          'first cpu', 'steady cpu')
  print(f'\n# d{args.depth if not args.smoke else "smoke"}, batch {args.batch}, MVAR, cfg 1.5, '
        f'top-k 900, top-p 0.96, blocks looped: {args.loop_blocks}; median s of {args.runs} runs; '
        f'1-min load average '
        f'{min(loads):.1f}..{max(loads):.1f} ({os.cpu_count()} CPUs)')
  print(f'{"process":<16}' + ''.join(f'{c:>11}' for c in cols) + f'{"first/steady":>14}'
        f'{"(cpu)":>7}')
  for which, runs in results.items():
    med = {c: statistics.median(r[c] for r in runs) for c in cols}
    ratio = statistics.median(r['first'] / r['steady'] for r in runs)
    ratio_cpu = statistics.median(r['first cpu'] / r['steady cpu'] for r in runs)
    print(f'{which:<16}' + ''.join(f'{med[c]:>11.2f}' for c in cols) + f'{ratio:>14.2f}'
          f'{ratio_cpu:>7.2f}')
  print('# first = the whole first sample() call; trace/lower/cache load/compile are the parts '
        'JAX reports inside it; the rest of it is the first execution. cpu: process CPU time '
        '(all threads), steadier than wall time on a shared machine.')


if __name__ == '__main__':
  main()
