r"""Times 2D neighbourhood attention implementations, forward and forward+backward.

  python launch/bench_neighborhood_attention.py                      # full sweep (GPU)
  python launch/bench_neighborhood_attention.py --maps=32x32 --batches=32 --heads=16 \
      --impls=pallas,cudnn_masked --pallas_configs='q=64,k=64;q=32,k=32,warps=2'
  python launch/bench_neighborhood_attention.py --smoke              # tiny, runs on CPU
  python launch/bench_neighborhood_attention.py --impls=gather,dense_masked,blocked \
      --maps=16x16,32x32,64x64 --batches=2 --heads=16 --dtype=float32 --blocked_rows=0,2,4,8
                                                                     # the CPU/TPU choice of 'auto'

Implementations (--impls):
  gather        pure-JAX gathered windows (reference.na2d_gather)
  dense_masked  dense attention under the (N, N) neighbourhood mask, XLA (reference.na2d_dense)
  blocked       query row blocks x their key-row band, pure JAX (blocked.na2d_blocked; one
                column per --blocked_rows entry, 0 = its default)
  cudnn_masked  jax.nn.dot_product_attention(mask=..., implementation='cudnn')
  dense_nomask  jax.nn.dot_product_attention without a mask, cuDNN (XLA off-GPU): a ceiling
                for what a fused library does with all N keys, not the same function
  pallas        the fused Pallas kernels (one column per --pallas_configs entry)

Method (see .library/device/METHOD.md): every case runs in a fresh process (--isolate), so
`peak_bytes_in_use` belongs to that case alone; it is read after one forward and after one
forward+backward on a single input set, before timing. Timing: compile and warm up, then
--reps samples of --inner back-to-back calls (rotating over input sets that together exceed
the L2 cache), each sample synchronised with block_until_ready; the median per call is
reported, with the spread (max-min over median) of the samples.

Columns: ms = median per call; GB/s = minimum bytes / time, where the minimum is q, k, v
read once and out written once (forward), plus dout read and dq, dk, dv written once
(forward+backward); %hbm = that over --hbm_gbps; TF/s = useful neighbourhood FLOPs / time
(4*N*k^2*D per batch and head forward, 14*... forward+backward: dense impls do more work
than this counts); %roof = max(bytes/hbm, flops/peak) / time; peak = device peak bytes in
use (includes XLA autotuning scratch); xla = argument + output + temp bytes from the
compiled executable's memory analysis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_bool('smoke', False, 'Tiny sizes and few reps: checks the script runs (CPU).')
flags.DEFINE_list('impls', ['gather', 'dense_masked', 'cudnn_masked', 'dense_nomask', 'pallas'],
                  'Implementations to time.')
flags.DEFINE_list('maps', ['13x13', '16x16', '32x32'], 'Map sizes HxW.')
flags.DEFINE_list('batches', ['32', '128'], 'Batch sizes.')
flags.DEFINE_list('heads', ['16', '24'], 'Head counts.')
flags.DEFINE_integer('head_dim', 64, 'Head dimension.')
flags.DEFINE_integer('kernel_size', 7, 'Neighbourhood window (odd).')
flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'], 'Input dtype.')
flags.DEFINE_list('passes', ['fwd', 'fwd+bwd'], 'Which passes to time.')
flags.DEFINE_list('blocked_rows', ['0'], 'Query rows per block for the blocked impl (0: default).')
flags.DEFINE_string('pallas_configs', '',
                    'Semicolon-separated BlockSizes overrides for the pallas impl, e.g. '
                    '"q=64,k=64,q_dq=64,k_dq=64,q_dkv=64,k_dkv=64,warps=4,stages=2,'
                    'warps_bwd=4,stages_bwd=2;q=32,k=32". Empty: the defaults.')
flags.DEFINE_float('hbm_gbps', 3350.0, 'Memory bandwidth for %hbm (H100 SXM datasheet; '
                   'measure it and pass the measured value).')
flags.DEFINE_float('peak_tflops', 989.0, 'Dense bf16 matrix rate for %roof (H100 SXM).')
flags.DEFINE_integer('warmup', 3, 'Untimed calls after compilation.')
flags.DEFINE_integer('reps', 15, 'Timed samples (median reported).')
flags.DEFINE_integer('inner', 10, 'Calls per timed sample.')
flags.DEFINE_integer('rotate_mb', 256, 'Input sets rotate until they hold this many MiB.')
flags.DEFINE_bool('compile_only', False, 'Only compile and report XLA memory analysis (no timing): '
                  'fast, and meaningful on a busy machine.')
flags.DEFINE_bool('isolate', True, 'Run every case in a fresh process (clean peak memory).')
flags.DEFINE_integer('case_timeout_s', 300, 'Per-case subprocess time limit.')
flags.DEFINE_string('json_out', '', 'Also append every result as a JSON line here.')
flags.DEFINE_string('case', '', 'Internal: run this one JSON-encoded case and print RESULT.')

FLAGS = flags.FLAGS

_BLOCK_KEYS = {'q': 'block_q', 'k': 'block_k', 'q_dq': 'block_q_dq', 'k_dq': 'block_k_dq',
               'q_dkv': 'block_q_dkv', 'k_dkv': 'block_k_dkv', 'warps': 'num_warps',
               'stages': 'num_stages', 'warps_bwd': 'num_warps_bwd',
               'stages_bwd': 'num_stages_bwd'}


@dataclasses.dataclass
class Case:
  impl: str
  height: int
  width: int
  batch: int
  heads: int
  head_dim: int
  kernel_size: int
  dtype: str
  passes: tuple[str, ...]
  pallas_config: str = ''  # BlockSizes overrides, 'q=64,k=32,...'; blocked: 'rows=4'

  @property
  def label(self) -> str:
    return f'{self.impl}[{self.pallas_config}]' if self.pallas_config else self.impl


def _block_sizes(spec: str, head_dim: int, dtype: str):
  """The kernel's default BlockSizes for this head dim and dtype, with spec's overrides."""
  from mvar_jax.kernels.neighborhood_attention.pallas_kernel import BlockSizes
  overrides = {}
  for item in filter(None, spec.split(',')):
    key, value = item.split('=')
    if key.strip() not in _BLOCK_KEYS:
      raise ValueError(f'unknown pallas config key {key!r}; allowed: {sorted(_BLOCK_KEYS)}')
    overrides[_BLOCK_KEYS[key.strip()]] = int(value)
  block_sizes = dataclasses.replace(BlockSizes.get_default(head_dim, _np_dtype(dtype)), **overrides)
  block_sizes.validate()
  return block_sizes


# ---------------------------------------------------------------------------------------------
# One case (runs in the child process when isolated).
# ---------------------------------------------------------------------------------------------
def _attention_fn(case: Case):
  import jax
  import jax.numpy as jnp
  from mvar_jax.kernels.neighborhood_attention import pallas_kernel
  from mvar_jax.kernels.neighborhood_attention import reference

  on_gpu = jax.default_backend() == 'gpu'
  kw = dict(height=case.height, width=case.width, kernel_size=case.kernel_size)
  if case.impl == 'gather':
    return lambda q, k, v: reference.na2d_gather(q, k, v, **kw)
  if case.impl == 'dense_masked':
    return lambda q, k, v: reference.na2d_dense(q, k, v, **kw)
  if case.impl == 'blocked':
    from mvar_jax.kernels.neighborhood_attention import blocked
    rows = int(case.pallas_config.split('=')[1]) if case.pallas_config else None
    return lambda q, k, v: blocked.na2d_blocked(q, k, v, block_rows=rows, **kw)
  if case.impl == 'cudnn_masked':
    if not on_gpu:
      raise NotImplementedError('cuDNN needs a GPU')
    mask_11NN = jnp.asarray(reference.neighbor_mask(case.height, case.width,
                                                    case.kernel_size))[None, None]
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask_11NN,
                                                        implementation='cudnn')
  if case.impl == 'dense_nomask':
    impl = 'cudnn' if on_gpu else None
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)
  if case.impl == 'pallas':
    block_sizes = _block_sizes(case.pallas_config, case.head_dim, case.dtype)
    return lambda q, k, v: pallas_kernel.na2d_pallas(q, k, v, block_sizes=block_sizes,
                                                     interpret=not on_gpu, **kw)
  raise ValueError(f'unknown impl {case.impl!r}')


def _pass_fn(attend, which: str):
  import jax
  if which == 'fwd':
    return jax.jit(lambda q, k, v, dout: attend(q, k, v))

  def fwd_bwd(q, k, v, dout):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(dout))
  return jax.jit(fwd_bwd)


def _peak_bytes():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def _counts(case: Case, which: str):
  """(minimum HBM bytes, useful FLOPs) of one call."""
  import numpy as np
  n = case.height * case.width
  tensor = case.batch * n * case.heads * case.head_dim * np.dtype(_np_dtype(case.dtype)).itemsize
  per_head_fwd = 4 * n * case.kernel_size ** 2 * case.head_dim  # QK^T and PV, 2 FLOPs a MAC
  flops_fwd = case.batch * case.heads * per_head_fwd
  if which == 'fwd':
    return 4 * tensor, flops_fwd  # q, k, v read; out written
  # + dout read, dq/dk/dv written; backward = 5 products (recomputed QK^T, dV, dP, dQ, dK).
  return 8 * tensor, flops_fwd * 7 // 2


def _np_dtype(name):
  import jax.numpy as jnp
  return {'bfloat16': jnp.bfloat16, 'float16': jnp.float16, 'float32': jnp.float32}[name]


def run_case(case: Case) -> list[dict]:
  import jax
  import numpy as np
  import bench_memory  # launch/: the program-memory sum of a memory_analysis

  rows = []
  device = jax.devices()[0]
  device = f'jax {jax.__version__} on {device.platform}: {device.device_kind}'
  shape = (case.batch, case.height * case.width, case.heads, case.head_dim)
  dtype = _np_dtype(case.dtype)
  set_bytes = 4 * math.prod(shape) * np.dtype(dtype).itemsize
  n_sets = int(min(8, max(2, math.ceil(FLAGS.rotate_mb * 2**20 / set_bytes))))

  def make_set(seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, shape, dtype) for key in keys)

  try:
    attend = _attention_fn(case)
  except NotImplementedError as e:
    return [dict(_base(case, w), device=device, status=f'skipped: {e}') for w in case.passes]

  sets = [make_set(0)]
  for which in case.passes:
    row = dict(_base(case, which), device=device)
    try:
      fn = _pass_fn(attend, which)
      compiled = fn.lower(*sets[0]).compile()
      mem = compiled.memory_analysis()
      if mem is not None:
        row['xla_bytes'] = int(bench_memory.program_memory(mem).peak)
      if FLAGS.compile_only:
        row['status'] = 'compiled'
        rows.append(row)
        continue
      jax.block_until_ready(fn(*sets[0]))
      row['peak_bytes'] = _peak_bytes()  # one set only: timing sets come after
      while len(sets) < n_sets:
        sets.append(make_set(len(sets)))
      for i in range(FLAGS.warmup):
        jax.block_until_ready(fn(*sets[i % n_sets]))
      samples = []
      for r in range(FLAGS.reps):
        t0 = time.perf_counter()
        for i in range(FLAGS.inner):
          result = fn(*sets[(r * FLAGS.inner + i) % n_sets])
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - t0) / FLAGS.inner)
      med = statistics.median(samples)
      nbytes, flops = _counts(case, which)
      row.update(status='ok', ms=med * 1e3, spread=(max(samples) - min(samples)) / med,
                 bytes=nbytes, flops=flops, input_sets=n_sets)
    except Exception as e:  # OOM or an unsupported configuration: report, keep going
      row['status'] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
    rows.append(row)
  return rows


def _base(case: Case, which: str) -> dict:
  return dict(impl=case.label, map=f'{case.height}x{case.width}', batch=case.batch,
              heads=case.heads, head_dim=case.head_dim, kernel_size=case.kernel_size,
              dtype=case.dtype, which=which)


# ---------------------------------------------------------------------------------------------
# Driver: one subprocess per case, then the table.
# ---------------------------------------------------------------------------------------------
def _cases() -> list[Case]:
  if FLAGS.smoke:
    maps, batches, heads, head_dim = ['13x13', '8x8'], [1], [2], 16
  else:
    maps, batches = FLAGS.maps, [int(b) for b in FLAGS.batches]
    heads, head_dim = [int(h) for h in FLAGS.heads], FLAGS.head_dim
  pallas_configs = FLAGS.pallas_configs.split(';') if FLAGS.pallas_configs else ['']
  cases = []
  for hw in maps:
    height, width = (int(x) for x in hw.lower().split('x'))
    for batch in batches:
      for n_heads in heads:
        for impl in FLAGS.impls:
          configs = {'pallas': pallas_configs,
                     'blocked': [f'rows={r}' if int(r) else '' for r in FLAGS.blocked_rows]}
          for config in configs.get(impl, ['']):
            if impl == 'pallas':
              _block_sizes(config, head_dim, FLAGS.dtype)  # errors at the edge, before any run
            cases.append(Case(impl, height, width, batch, n_heads, head_dim,
                              FLAGS.kernel_size, FLAGS.dtype, tuple(FLAGS.passes), config))
  return cases


def _run_isolated(case: Case) -> list[dict]:
  argv = [sys.executable, os.path.abspath(__file__),
          f'--case={json.dumps(dataclasses.asdict(case))}']
  for name in ('warmup', 'reps', 'inner', 'rotate_mb', 'smoke', 'compile_only'):
    argv.append(f'--{name}={FLAGS[name].value}')
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=FLAGS.case_timeout_s)
  except subprocess.TimeoutExpired:
    return [dict(_base(case, w), status='timeout') for w in case.passes]
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  tail = (proc.stderr.strip().splitlines() or ['no output'])[-1][:160]
  return [dict(_base(case, w), status=f'crashed (rc={proc.returncode}): {tail}')
          for w in case.passes]


def _fmt_table(rows: list[dict]) -> str:
  header = (f'{"impl":<28} {"map":>5} {"B":>4} {"hd":>3} {"pass":<7} {"ms":>8} {"spread":>6} '
            f'{"GB/s":>7} {"%hbm":>5} {"TF/s":>6} {"%roof":>5} {"peak MiB":>9} {"xla MiB":>8}')
  lines = [header, '-' * len(header)]
  mib = lambda b: f'{b / 2**20:9.0f}' if b else f'{"n/a":>9}'
  for r in rows:
    prefix = f'{r["impl"]:<28} {r["map"]:>5} {r["batch"]:>4} {r["heads"]:>3} {r["which"]:<7}'
    if r.get('status') == 'compiled':
      lines.append(f'{prefix} {"compiled only":>58} {mib(r.get("xla_bytes")).strip():>8}')
      continue
    if r.get('status') != 'ok':
      lines.append(f'{prefix} {r.get("status")}')
      continue
    sec = r['ms'] * 1e-3
    gbps = r['bytes'] / sec / 1e9
    tflops = r['flops'] / sec / 1e12
    floor = max(r['bytes'] / (FLAGS.hbm_gbps * 1e9), r['flops'] / (FLAGS.peak_tflops * 1e12))
    lines.append(f'{prefix} {r["ms"]:8.3f} {r["spread"]:6.2f} {gbps:7.0f} '
                 f'{100 * gbps / FLAGS.hbm_gbps:5.1f} {tflops:6.1f} {100 * floor / sec:5.1f} '
                 f'{mib(r.get("peak_bytes"))} {mib(r.get("xla_bytes")).strip():>8}')
  return '\n'.join(lines)


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if FLAGS.smoke:
    FLAGS.warmup, FLAGS.reps, FLAGS.inner = 1, 3, 2
  if FLAGS.case:
    case = Case(**{**json.loads(FLAGS.case), 'passes': tuple(json.loads(FLAGS.case)['passes'])})
    print('RESULT ' + json.dumps(run_case(case)), flush=True)
    return

  # With --isolate this process never touches the device: a parent holding GPU memory would
  # shrink what every child can allocate.
  rows = []
  for case in _cases():
    t0 = time.time()
    case_rows = _run_isolated(case) if FLAGS.isolate else run_case(case)
    rows.extend(case_rows)
    if FLAGS.json_out:  # as we go: a long sweep cut short keeps what it measured
      with open(FLAGS.json_out, 'a') as f:
        for r in case_rows:
          f.write(json.dumps(r) + '\n')
    print(f'# {case.label} {case.height}x{case.width} B{case.batch} h{case.heads}: '
          f'{", ".join(r.get("status", "?") for r in case_rows)} ({time.time() - t0:.0f}s)',
          flush=True)
  device = next((r['device'] for r in rows if 'device' in r), 'unknown device')
  print(f'# {device}; dtype {FLAGS.dtype}, kernel {FLAGS.kernel_size}, '
        f'hbm {FLAGS.hbm_gbps:.0f} GB/s, peak {FLAGS.peak_tflops:.0f} TF/s')
  print(_fmt_table(rows))


if __name__ == '__main__':
  app.run(main)
