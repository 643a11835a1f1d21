r"""Where a sampler call's device time goes, from a jax.profiler trace (Chrome JSON, .json.gz).

  python launch/trace_summary.py ours_MVAR.trace.json.gz [--top=20] [--hlo=ours_MVAR.hlo.txt.gz]

bench_vs_official.py --trace_dir writes such a file for one call of our sampler (GPU). Device
kernels are split into phases: each scale of the transformer loop ends with the selection of
its kept logits (top-k/top-p: XLA's sort, or our Pallas kernel `kept_threshold`), so the
kernels up to a scale's selection are that scale, and everything after the last one is the
VQ-VAE decode. Within a phase kernels are grouped by what they are:
matmuls (cuBLAS / XLA gemm fusions), convolutions (cuDNN), neighbourhood attention (our
Pallas kernel), the selection, copies/memsets, and the rest (XLA fusions: elementwise, norms,
reductions). Prints markdown tables: busy ms per phase and group, the idle gaps by what
borders them (`gaps`), then the top kernels,
each XLA fusion with its output shape and the source op it was named after, read from the
program's optimised HLO (--hlo; by default the `.hlo.txt.gz` that --trace_dir writes beside
the trace, when it is there).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re

GROUPS = ('matmul', 'conv', 'na2d', 'select', 'copy', 'fusion')


def kernel_group(name: str) -> str:
  n = name.lower()
  if 'fprop' in n or 'dgrad' in n or 'wgrad' in n or 'conv' in n.split('_')[0]:
    return 'conv'
  if 'nvjet' in n or 'gemm' in n or 'cublas' in n or 'dense_gelu' in n:
    return 'matmul'  # (dense_gelu: our fc1 with the GELU in its epilogue)
  if 'na2d' in n:
    return 'na2d'
  if n.startswith('sort') or n.startswith('kept_threshold'):
    return 'select'
  if 'memcpy' in n or 'memset' in n:
    return 'copy'
  return 'fusion'


def device_kernels(path: str) -> list[dict]:
  """Complete ('X') events on the device's streams, in time order."""
  with gzip.open(path) if path.endswith('.gz') else open(path) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  device_pids = {e['pid'] for e in events
                 if e.get('ph') == 'M' and e.get('name') == 'process_name'
                 and str(e.get('args', {}).get('name', '')).startswith('/device:')}
  out = [e for e in events if e.get('ph') == 'X' and e.get('pid') in device_pids]
  if not out:
    raise SystemExit(f'{path}: no device kernels (a CPU trace, or the trace is empty)')
  return sorted(out, key=lambda e: e['ts'])


_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (?:fusion|custom-call)\((.*)$')


def hlo_sources(path: str) -> dict[str, tuple[str, str]]:
  """{kernel name: (output shape, op_name)} for the fusions and custom calls of an HLO text.

  A trace names a fusion's kernel after one of the instructions that share it (XLA emits
  one kernel for identical fusions, marked with a common `deduplicated_name`), with '.' as
  '_': every instruction is a key, and so is each deduplicated name. cuBLAS and cuDNN
  kernels carry library names and are not found here.
  """
  out = {}
  with gzip.open(path, 'rt') if path.endswith('.gz') else open(path) as f:
    for line in f:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, shape, rest = m.groups()
      dedup = re.search(r'deduplicated_name="([^"]+)"', rest)
      op = re.search(r'op_name="([^"]*)"', rest)
      source = op.group(1) if op else ''
      for noise in ('jit(_scale_loop)/', 'while/body/', 'eval_jaxpr/',
                    'jit(fhat_to_img)/VQVAE.fhat_to_img/'):
        source = source.replace(noise, '')
      entry = (shape.split('{')[0], source)
      out[name.replace('.', '_')] = entry
      if dedup:
        out.setdefault(dedup.group(1).replace('.', '_'), entry)
  return out


def phases(kernels: list[dict]) -> list[tuple[str, list[dict]]]:
  """[(name, kernels)]: 'scale i' up to and including each sort, then 'decode'."""
  ends = [i for i, e in enumerate(kernels) if kernel_group(e['name']) == 'select']
  out, start = [], 0
  for si, end in enumerate(ends):
    out.append((f'scale {si}', kernels[start:end + 1]))
    start = end + 1
  out.append(('decode' if ends else 'all', kernels[start:]))
  return out


def span_ms(kernels: list[dict]) -> float:
  return (kernels[-1]['ts'] + kernels[-1]['dur'] - kernels[0]['ts']) / 1e3 if kernels else 0.0


def busy_ms(kernels: list[dict]) -> float:
  return sum(e['dur'] for e in kernels) / 1e3


GAP_KINDS = ('after a host-to-device copy', 'around a memset', 'between kernels')


def gaps(kernels: list[dict]) -> dict[str, tuple[int, float]]:
  """{kind: (count, ms)} of the idle time between consecutive device events.

  A gap after a host-to-device copy is the device waiting for the host (a call's start: its
  arguments are copied, then the first CUDA graph is launched). cuBLAS and cuDNN put small
  memsets before some of their kernels; a gap on either side of one is counted with it.
  """
  out = {k: [0, 0.0] for k in GAP_KINDS}
  end = kernels[0]['ts'] + kernels[0]['dur'] if kernels else 0.0
  for prev, e in zip(kernels, kernels[1:]):
    if e['ts'] > end:
      kind = ('after a host-to-device copy' if prev['name'].startswith('MemcpyH2D') else
              'around a memset' if prev['name'].startswith('Memset')
              or e['name'].startswith('Memset') else 'between kernels')
      out[kind][0] += 1
      out[kind][1] += (e['ts'] - end) / 1e3
    end = max(end, e['ts'] + e['dur'])
  return {k: (n, ms) for k, (n, ms) in out.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('trace')
  p.add_argument('--top', type=int, default=15, help='kernels listed by total time')
  p.add_argument('--hlo', default='', help="the program's optimised HLO text (.gz or plain)")
  args = p.parse_args(argv)
  hlo = args.hlo or args.trace.replace('.trace.json.gz', '.hlo.txt.gz')
  sources = hlo_sources(hlo) if hlo != args.trace and os.path.exists(hlo) else {}
  kernels = device_kernels(args.trace)
  print(f'{len(kernels)} kernels; wall span {span_ms(kernels):.2f} ms, device busy '
        f'{busy_ms(kernels):.2f} ms\n')
  print('| phase | span ms | busy ms | ' + ' | '.join(GROUPS) + ' |')
  print('|---|---|---|' + '---|' * len(GROUPS))
  rows = phases(kernels)
  loop = [e for name, ks in rows if name.startswith('scale') for e in ks]
  if len(rows) > 1:
    rows = rows + [('transformer loop (all scales)', loop)]
  for name, ks in rows:
    by = collections.Counter()
    for e in ks:
      by[kernel_group(e['name'])] += e['dur'] / 1e3
    print(f'| {name} | {span_ms(ks):.2f} | {busy_ms(ks):.2f} | ' +
          ' | '.join(f'{by[g]:.2f}' for g in GROUPS) + ' |')
  print('\n| idle gaps | count | ms |')
  print('|---|---|---|')
  for kind, (n, ms) in gaps(kernels).items():
    print(f'| {kind} | {n} | {ms:.2f} |')
  totals = collections.defaultdict(lambda: [0.0, 0])
  for e in kernels:
    totals[e['name']][0] += e['dur'] / 1e3
    totals[e['name']][1] += 1
  print('\n| kernel | group | calls | ms | output | source op |')
  print('|---|---|---|---|---|---|')
  for name, (ms, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:args.top]:
    shape, source = sources.get(name, ('', ''))
    print(f'| {name[:80]} | {kernel_group(name)} | {calls} | {ms:.2f} | {shape[:48]} | '
          f'{source[-90:]} |')


if __name__ == '__main__':
  main()
