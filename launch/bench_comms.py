r"""Collective traffic of one training step per device, from the compiled program (no weights).

  python launch/bench_comms.py                                 # d16..d30, 8 devices, 3 meshes
  python launch/bench_comms.py --depths=16 --meshes=8x1,1x8 --local_batch=32
  python launch/bench_comms.py --smoke    # tiny model, 8-way FSDP, the first segment only

The trainer's own step (`train.compile_train_step`: the same sharding rules, the same
segments) is lowered on abstract arrays for a mesh of `--devices` devices and compiled;
nothing is allocated, so a CPU host with simulated devices answers for a GPU or TPU slice
(the partitioner that places the collectives runs before the backend). From the partitioned
program it counts, per device, the bytes every all-gather, reduce-scatter, all-reduce,
all-to-all and collective-permute moves over the links (ring algorithms: (n-1)/n of the
gathered or scattered size, twice that for an all-reduce, n = group size), and from
`cost_analysis()` the FLOPs each device computes. XLA:CPU leaves an FSDP gradient reduction
as an all-reduce followed by a slice, where the GPU and TPU pipelines form a reduce-scatter:
on a CPU host the all-reduce column of an FSDP mesh is about twice what a GPU sends.

The last columns turn both into milliseconds at `--link_gbps` (per direction; 450 GB/s is
NVLink 4 on an H100/H200 node, ~50 GB/s one 400 Gb/s NIC per GPU across nodes) and at
`--tflops` (dense bf16 the GPU sustains): where comm ms approaches compute ms, that mesh
needs overlap (XLA's async collectives) or a larger local batch. Meshes are data x fsdp:
'data' replicates the weights and all-reduces gradients; 'fsdp' shards weights and optimiser
state, all-gathers weights per layer and reduce-scatters gradients (`mvar_jax/sharding.py`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
         's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}

_OP = re.compile(r'= (?P<shape>\(.*?\)|\S+) (?P<kind>' + '|'.join(KINDS)
                 + r')(?P<start>-start)?\((?P<rest>.*)$')
_ARRAY = re.compile(r'([a-z]+[0-9]*)\[([0-9,]*)\]')
_IOTA_GROUPS = re.compile(r'replica_groups=\[(\d+),(\d+)\]')
_LIST_GROUPS = re.compile(r'replica_groups=\{\{([0-9,]*)\}')
_PAIRS = re.compile(r'source_target_pairs=\{([^}]*)\}')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--depths', default='16,20,24,30')
  p.add_argument('--devices', type=int, default=8, help='simulated CPU devices (if on CPU)')
  p.add_argument('--meshes', default='8x1,4x2,1x8', help='data x fsdp, comma-separated')
  p.add_argument('--local_batch', type=int, default=16, help='images per device per step')
  p.add_argument('--dtype', default='bfloat16', help='compute dtype of the transformer')
  p.add_argument('--link_gbps', type=float, default=450.0, help='GB/s per direction per device')
  p.add_argument('--tflops', type=float, default=790.0, help='sustained dense TFLOP/s per device')
  p.add_argument('--first_segment_only', action='store_true',
                 help='only scales 0..refine_step-1 (one compile per mesh)')
  p.add_argument('--smoke', action='store_true')
  return p.parse_args(argv)


def _array_bytes(shape: str) -> list[int]:
  return [BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(',') if d)
          for dt, dims in _ARRAY.findall(shape)]


def _group_size(rest: str, num_devices: int) -> int:
  m = _IOTA_GROUPS.search(rest)
  if m:
    return int(m.group(2))
  m = _LIST_GROUPS.search(rest)
  if m:
    return len(m.group(1).split(','))
  return num_devices  # replica_groups={}: every device


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Bytes each device sends per kind of collective in a partitioned HLO module's text."""
  sent = collections.Counter()
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    kind, rest = m.group('kind'), m.group('rest')
    sizes = _array_bytes(m.group('shape'))
    if m.group('start') and kind in ('all-gather', 'collective-permute'):
      sizes = sizes[len(sizes) // 2:]  # async start: (operands, results)
    size = sum(sizes)
    if kind == 'collective-permute':
      pairs = _PAIRS.search(rest)
      sent[kind] += size if pairs and pairs.group(1) else 0
      continue
    n = _group_size(rest, num_devices)
    if n <= 1:
      continue
    if kind == 'all-gather' or kind == 'all-to-all':
      sent[kind] += size * (n - 1) / n  # size: the gathered result
    elif kind == 'reduce-scatter':
      sent[kind] += size * (n - 1)  # size: this device's 1/n of the reduced operand
    else:  # all-reduce: reduce-scatter then all-gather
      sent[kind] += 2 * size * (n - 1) / n
  return dict(sent)


@dataclasses.dataclass
class Row:
  depth: int
  mesh: str
  segment: str
  tokens: int
  sent: dict
  gflop: float


def _config(args, depth: int, data: int, fsdp: int):
  if args.smoke:
    config = importlib.import_module('configs.demo').get_config()
    config.model.depth, config.model.width, config.model.num_heads = depth, 64, 2
  else:
    config = importlib.import_module(f'configs.mvar_d{depth}').get_config()
  config.model.dtype = args.dtype
  config.mesh.update({'data': data, 'fsdp': fsdp, 'num_devices': data * fsdp})
  config.train.batch_size = args.local_batch * data * fsdp
  return config


def measure(args, depth: int, data: int, fsdp: int) -> list[Row]:
  """One row per segment the trainer steps on (scales 0..refine_step-1, then each later
  scale; the first only with --first_segment_only)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from mvar_jax import sharding, train, vqvae as vq

  config = _config(args, depth, data, fsdp)
  mesh = sharding.create_mesh(config.mesh)
  schedule = train.Schedule(total_steps=10, warmup_steps=1, steps_per_epoch=10, peak_lr=1e-4)
  setup = train.build(config, schedule, mesh)
  state = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      setup.abstract_state, setup.state_shardings)
  tcfg = setup.model.config
  layout = tcfg.layout
  vcfg = vq.VQVAEConfig(patch_nums=tcfg.layout.patch_nums, vocab_size=tcfg.vocab_size,
                        z_channels=tcfg.cvae)
  quantize = nn.unbox(jax.eval_shape(lambda: vq.init_params(vcfg, jax.random.key(0)))
                      ['params']['quantize'])
  tok = {'quantize': jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=setup.replicated), quantize)}
  tok_sh = jax.tree_util.tree_map(lambda _: setup.replicated, tok)
  b = config.train.batch_size
  batch = {'ids': jax.ShapeDtypeStruct((b, layout.total_len), jnp.int32,
                                       sharding=setup.batch_sharding),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=setup.batch_sharding)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  # The official segment schedule, whatever the config trains with (the demo: all scales).
  segments = train.segments('segments', layout.num_scales, tcfg.attention.refine_step)
  segments = segments[:1] if args.first_segment_only else segments
  rows = []
  for first, last in segments:
    fn = train.compile_train_step(setup, vq.Tokenizer(vcfg), tok_sh, first=first, last=last,
                                  label_smoothing=0.1, ema_decay=0.0)
    compiled = fn.lower(state, batch, key, tok).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    lo, hi = layout.span(first, last)
    rows.append(Row(depth, f'{data}x{fsdp}', f'{first}..{last}' if first != last else str(first),
                    hi - lo, collective_bytes(compiled.as_text(), data * fsdp),
                    float(cost.get('flops', 0.0)) / 1e9))
  return rows


def param_bytes(args, depth: int) -> int:
  """fp32 bytes of the transformer's parameters (what one gradient all-reduce carries)."""
  import jax
  import numpy as np
  from mvar_jax import config_utils, transformer as tfm
  cfg = config_utils.transformer_config_from(_config(args, depth, 1, 1))
  shapes = jax.eval_shape(lambda: tfm.init_params(cfg, jax.random.key(0)))
  return 4 * sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    # Activations far larger than the weights: where a misplaced sharding shows.
    args.depths, args.meshes, args.local_batch, args.devices = '2', '1x8', 64, 8
    args.first_segment_only = True
  import jax
  try:  # simulated devices when this is a CPU host (no effect on a GPU's device count)
    jax.config.update('jax_num_cpu_devices', args.devices)
  except RuntimeError:  # JAX's backends already started (the tests' process): keep theirs
    pass
  meshes = [tuple(int(x) for x in m.split('x')) for m in args.meshes.split(',')]
  rows = []
  for depth in (int(d) for d in args.depths.split(',')):
    for data, fsdp in meshes:
      if data * fsdp > jax.device_count():
        print(f'# skip mesh {data}x{fsdp}: {jax.device_count()} devices', flush=True)
        continue
      t = time.time()
      rows.extend(measure(args, depth, data, fsdp))
      print(f'# d{depth} mesh {data}x{fsdp}: compiled in {time.time() - t:.0f} s', flush=True)

  dev = jax.devices()[0]
  print(f'\n# jax {jax.__version__}, partitioned for {dev.platform}; per device: '
        f'{args.local_batch} images, {args.dtype} compute, fp32 params and AdamW state')
  print(f'# MB each device sends per step; ms at {args.link_gbps:g} GB/s and '
        f'{args.tflops:g} TFLOP/s')
  header = (f'{"model":<6}{"mesh":>6}{"segment":>9}{"tokens":>7}{"all-gath":>10}{"red-scat":>10}'
            f'{"all-red":>10}{"other":>8}{"total MB":>10}{"GFLOP":>9}{"comm ms":>9}'
            f'{"comp ms":>9}{"ratio":>7}')
  print(header)
  print('-' * len(header))
  for r in rows:
    mb = {k: r.sent.get(k, 0.0) / 1e6 for k in KINDS}
    total = sum(mb.values())
    comm_ms = total / 1e3 / args.link_gbps * 1e3
    comp_ms = r.gflop / args.tflops
    other = mb['all-to-all'] + mb['collective-permute']
    print(f'{"d" + str(r.depth):<6}{r.mesh:>6}{r.segment:>9}{r.tokens:>7}'
          f'{mb["all-gather"]:>10.1f}{mb["reduce-scatter"]:>10.1f}{mb["all-reduce"]:>10.1f}'
          f'{other:>8.1f}{total:>10.1f}{r.gflop:>9.0f}{comm_ms:>9.2f}{comp_ms:>9.2f}'
          f'{comm_ms / comp_ms if comp_ms else float("nan"):>7.2f}')
  return rows


if __name__ == '__main__':
  main()
