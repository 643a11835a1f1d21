"""Peak memory (RSS) of converting a .pth and of loading the converted weights, vs the file size.

    python launch/bench_converter_memory.py --workdir=/tmp/convmem            # d16 + VQ-VAE
    python launch/bench_converter_memory.py --workdir=/tmp/convmem --depth=2  # quick check

Builds official-name state dicts of random float32 weights (the shapes of a freshly initialised
model, mapped to upstream key names by `convert.params_to_state_dict`) and saves them as .pth,
like the released files: the transformer under 'mvar_wo_ddp', the VQ-VAE as a bare state dict.
Then each stage runs in a fresh process that reports `resource.getrusage` peak RSS and the RSS
right after its imports (torch, jax: the interpreter's fixed cost, not the converter's):

  convert      python -m mvar_jax.convert --vae/--transformer FILE --out DIR
  load numpy   checkpointing.load_converted(DIR, name)     (the trainer's path)
  load jax     api.load_converted(DIR, name)               (the API's path: arrays on the device)

To measure another version of the package (e.g. before a change), put it first on PYTHONPATH:
    git archive <rev> mvar_jax | tar -x -C /tmp/old && \
      PYTHONPATH=/tmp/old python launch/bench_converter_memory.py --workdir=/tmp/convmem
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

# After PYTHONPATH, so that another version of the package put there is the one measured.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(_REPO)

_CHILD = r'''
import json, resource, sys, time
def rss():
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmRSS:'))
stage, src, out, name = sys.argv[1:5]
if stage == 'convert':
  import torch  # only the converter reads .pth files
import jax, numpy
from mvar_jax import api, checkpointing, convert
base = rss()
t = time.time()
if stage == 'convert':
  convert.main([{'vqvae': '--vae'}.get(name, '--transformer'), src, '--out', out])
elif stage == 'load numpy':
  checkpointing.load_converted(out, name)
else:
  _, params = api.load_converted(out, name)
  jax.block_until_ready(params)
seconds = time.time() - t
with open('/proc/self/status') as f:
  hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM:'))
print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  'hwm': hwm, 'base': base, 'seconds': seconds,
                  'package': convert.__file__}))
'''


def build_files(workdir: str, depth: int) -> dict[str, str]:
  """{'transformer': path, 'vqvae': path} of random official-name .pth files."""
  import jax
  import flax.linen as nn
  import torch
  from mvar_jax import convert, transformer, vqvae
  rng = np.random.default_rng(0)
  paths = {}
  for name in ('vqvae', 'transformer'):
    path = os.path.join(workdir, f'{name}_d{depth}.pth' if name == 'transformer' else f'{name}.pth')
    paths[name] = path
    if os.path.exists(path):
      continue
    if name == 'transformer':
      cfg = transformer.TransformerConfig(depth=depth, width=64 * depth, num_heads=depth)
      abstract = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
    else:
      abstract = jax.eval_shape(lambda: vqvae.init_params(vqvae.VQVAEConfig(), jax.random.key(0)))
    tree = jax.tree_util.tree_map(lambda s: 0.02 * rng.standard_normal(s.shape, dtype=np.float32),
                                  nn.unbox(abstract['params']))
    sd = {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in convert.params_to_state_dict(tree).items()}
    del tree
    torch.save({'mvar_wo_ddp': sd} if name == 'transformer' else sd, path)
    del sd
  return paths


def measure(stage: str, src: str, out: str, name: str) -> dict:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (os.environ.get('PYTHONPATH'), _REPO) if p))
  proc = subprocess.run([sys.executable, '-c', _CHILD, stage, src, out, name], env=env,
                        cwd=os.path.dirname(out), capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{stage} {name} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='where the .pth and converted files go')
  parser.add_argument('--depth', type=int, default=16, help='transformer depth (d16: 310M params)')
  parser.add_argument('--build_only', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  if args.build_only:
    build_files(args.workdir, args.depth)
    return
  # Linux carries a process's peak RSS across fork + exec: this parent stays small (no jax,
  # no torch, no weights) so that each child's getrusage peak is its own.
  subprocess.run([sys.executable, os.path.abspath(__file__), '--workdir', args.workdir,
                  '--depth', str(args.depth), '--build_only'], check=True)
  paths = {'vqvae': os.path.join(args.workdir, 'vqvae.pth'),
           'transformer': os.path.join(args.workdir, f'transformer_d{args.depth}.pth')}
  gib = 1024 ** 3
  print(f'| model | stage | .pth GiB | peak RSS GiB (VmHWM) | after imports GiB | peak / file | '
        f'(peak - imports) / file | s |')
  print('|---|---|---|---|---|---|---|---|')
  for name, src in paths.items():
    out = os.path.join(args.workdir, f'converted_d{args.depth}')
    size = os.path.getsize(src)
    for stage in ('convert', 'load numpy', 'load jax'):
      r = measure(stage, src, out, name)
      if stage == 'convert' and name == 'vqvae':
        print(f'converter: {r["package"]}')
      print(f'| {name} | {stage} | {size / gib:.2f} | {r["peak"] / gib:.2f} ({r["hwm"] / gib:.2f}) '
            f'| {r["base"] / gib:.2f} '
            f'| {r["peak"] / size:.2f} | {(r["peak"] - r["base"]) / size:.2f} | '
            f'{r["seconds"]:.1f} |', flush=True)


if __name__ == '__main__':
  main()
