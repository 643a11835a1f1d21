r"""Memory of sampling and of a training step from XLA's compiled memory analysis (no weights).

  python launch/bench_memory.py                                   # d16/d20/d24, batch 32, 256 px
  python launch/bench_memory.py --res=512 --depths=16,36          # the 512 px pyramid
  python launch/bench_memory.py --smoke                           # tiny, a few seconds

Every program is lowered on abstract shapes (jax.ShapeDtypeStruct) and compiled for the
default backend (CPU here; the GPU when JAX sees one), then
`compiled.memory_analysis()` gives its argument, output and temp bytes: the peak a run
needs is about argument + temp + output - alias (XLA's live-range packing of the temps).
Nothing is allocated, so the table works on any machine.

Rows: sampling (the whole KV-cache-free loop with CFG, top-k/top-p and the VQ-VAE decode to
images; MVAR, and VAR mode recomputing the prefix) and one training step (forward, backward,
AdamW; MVAR: the largest of its segments A = scales 0..refine_step-1 and each later scale;
VAR: the whole sequence). Columns split the sampler's peak into its parts: the transformer
at the last scale and the decoder alone.

The paper (MVAR, Table 6, RTX 4090, d16 batch 32, fp16 autocast): sampling 10.9 GB VAR vs
3.8 GB MVAR (2.9x).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import smoke_configs  # noqa: E402  (launch/)

PAPER_GB = {('MVAR', 16): 3.8, ('VAR', 16): 10.9}  # sampling, batch 32, RTX 4090
PATCH_NUMS = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
REFINE_STEP = {256: 8, 512: 6}  # configs/mvar_d16.py and configs/mvar_d16_512.py


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--depths', default='16,20,24')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--res', type=int, choices=sorted(PATCH_NUMS), default=256)
  p.add_argument('--dtype', default='',
                 help="transformer compute dtype; '' = bfloat16 on GPU, float32 elsewhere")
  p.add_argument('--param_dtype', default='float32',
                 help="sampling parameters as stored ('bfloat16': inference copies)")
  p.add_argument('--decode_batch', type=int, default=-1,
                 help='images per VQ-VAE decode chunk in the sampler (-1: its default, 0: all)')
  p.add_argument('--modes', default='mvar,var')
  p.add_argument('--skip_train', action='store_true')
  p.add_argument('--skip_parts', action='store_true', help='no per-part columns (faster)')
  p.add_argument('--cfg', type=float, default=1.5)
  p.add_argument('--top_k', type=int, default=900)
  p.add_argument('--grad_accum_steps', default='',
                 help="e.g. 1,4: also the peak of the trainer's own step per segment "
                      '(train.compile_train_step; bf16 compute, fp32 params and AdamW), the '
                      'batch in that many micro-batches (train.grad_accum_steps)')
  p.add_argument('--smoke', action='store_true')
  return p.parse_args(argv)


@dataclasses.dataclass
class Mem:
  args: int
  out: int
  temp: int
  alias: int

  @property
  def peak(self) -> int:
    return self.args + self.out + self.temp - self.alias


def analyse(fn, *abstract_args) -> Mem:
  return program_memory(fn.lower(*abstract_args).compile().memory_analysis())


def program_memory(m) -> Mem:
  """Mem of a `compiled.memory_analysis()` (its .peak: what the program needs)."""
  return Mem(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
             m.alias_size_in_bytes)


def _abstract(tree, dtype=None):
  import flax.linen as nn
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), nn.unbox(tree))


def build(args, depth: int, mode: str):
  from mvar_jax import transformer as tfm, vqvae
  from mvar_jax.attention import AttentionConfig
  pn = PATCH_NUMS[args.res]
  dtype = args.dtype or ('bfloat16' if jax.default_backend() == 'gpu' else 'float32')
  if args.smoke:
    v_cfg, t_cfg = smoke_configs.tiny(depth, mode=mode, dtype=dtype)
  else:
    v_cfg = vqvae.VQVAEConfig(patch_nums=pn, precision='default')
    t_cfg = tfm.preset(depth, patch_nums=pn, dtype=dtype,
                       attention=AttentionConfig(mode=mode, refine_step=REFINE_STEP[args.res]))
  v_abs = _abstract(jax.eval_shape(lambda: vqvae.init_params(v_cfg, jax.random.key(0)))['params'])
  t_abs = _abstract(jax.eval_shape(lambda: tfm.init_params(t_cfg, jax.random.key(0)))['params'],
                    jnp.dtype(args.param_dtype))
  return vqvae.Tokenizer(v_cfg), v_abs, tfm.MVARTransformer(t_cfg), t_abs


def sampler_mem(args, tok, v_abs, model, t_abs) -> Mem:
  from mvar_jax import sampling
  kw = {}
  if args.decode_batch >= 0:
    kw['decode_batch'] = args.decode_batch
  sampler = sampling.compile_sampler(model, t_abs, tok, v_abs, batch_size=args.batch,
                                     cfg=args.cfg, top_k=args.top_k, **kw)
  return program_memory(sampler.memory_analysis())


def _sampler_jit(fn):
  """jax.jit with the XLA options the sampler compiles with, so the parts add up."""
  from mvar_jax import sampling
  return jax.jit(fn, compiler_options=dict(sampling.compiler_options()) or None)


def decoder_mem(args, tok, v_abs) -> Mem:
  pn = tok.config.patch_nums[-1]
  f_hat = jax.ShapeDtypeStruct((args.batch, pn, pn, tok.config.z_channels), jnp.float32)
  return analyse(_sampler_jit(lambda p, f: tok.fhat_to_img(p, f)), v_abs, f_hat)


def last_scale_mem(args, model, t_abs) -> Mem:
  """The transformer's forward at the last scale on the CFG-doubled batch (MVAR only)."""
  cfg = model.config
  k = cfg.layout.num_scales - 1
  b = 2 * args.batch if args.cfg != 1.0 else args.batch
  x = jax.ShapeDtypeStruct((b, cfg.patch_nums[-1] ** 2, cfg.cvae), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  fn = _sampler_jit(lambda p, l, x: model.apply({'params': p}, l, x, first=k, last=k))
  return analyse(fn, t_abs, labels, x)


def train_mem(args, model, t_abs) -> tuple[Mem, str]:
  """The largest one-step program over the official segments (fp32 params, AdamW)."""
  import optax
  cfg = model.config
  layout = cfg.layout
  k = layout.num_scales
  if cfg.attention.mode == 'var':
    segs = [(0, k - 1)]
  else:
    segs = [(0, cfg.attention.refine_step - 1)] + [(s, s) for s in
                                                    range(cfg.attention.refine_step, k)]
  params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), t_abs)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  opt = jax.eval_shape(tx.init, params)
  first_l = layout.patch_nums[0] ** 2
  best = None
  for first, last in segs:
    lo, hi = layout.span(first, last)
    b = args.batch
    x = jax.ShapeDtypeStruct((b, hi - max(lo, first_l), cfg.cvae), jnp.float32)
    gt = jax.ShapeDtypeStruct((b, hi - lo), jnp.int32)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32)

    def step(p, o, labels, x, gt, first=first, last=last):
      def loss_fn(p):
        logits = model.apply({'params': p}, labels, x, first=first, last=last)
        return optax.softmax_cross_entropy_with_integer_labels(logits, gt).mean()
      grads = jax.grad(loss_fn)(p)
      updates, o = tx.update(grads, o, p)
      return optax.apply_updates(p, updates), o

    m = analyse(jax.jit(step, donate_argnums=(0, 1)), params, opt, labels, x, gt)
    name = f'{first}..{last}' if first != last else f'{first}'
    if best is None or m.peak > best[0].peak:
      best = (m, name)
  return best


def trainer_step_mem(args, depth: int, accum: int) -> list[tuple[str, Mem]]:
  """(segment, Mem) of `train.compile_train_step` on one device, abstract inputs: the program
  a training run executes, at --batch with `accum` micro-batches."""
  from configs import common
  from mvar_jax import optim, train
  tok, v_abs, model, _ = build(args, depth, 'mvar')  # the architecture bench rows use
  m = model.config
  c = common.get_config()
  for field in ('depth', 'width', 'num_heads', 'num_classes', 'vocab_size', 'cvae', 'patch_nums'):
    c.model[field] = getattr(m, field)
  c.model.refine_step, c.model.kernel_size = m.attention.refine_step, m.attention.kernel_size
  c.model.dtype = args.dtype or 'bfloat16'
  c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 1, 1, 1
  c.train.batch_size, c.train.grad_accum_steps = args.batch, accum
  setup = train.build(c, optim.Schedule(100, 10, 100, 1e-4))
  # The quantiser alone: all the step reads of the tokenizer (it gets token ids).
  q_abs = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=setup.replicated),
      {'quantize': v_abs['quantize']})
  tok_sh = jax.tree_util.tree_map(lambda _: setup.replicated, q_abs)
  layout = setup.model.config.layout
  batch = {'ids': jax.ShapeDtypeStruct((args.batch, layout.total_len), jnp.int32,
                                       sharding=setup.batch_sharding),
           'label': jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=setup.batch_sharding)}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=setup.replicated)
  out = []
  for first, last in train.segments('segments', layout.num_scales, c.model.refine_step):
    fn = train.compile_train_step(setup, tok, tok_sh, first=first, last=last, label_smoothing=0.0,
                                  ema_decay=0.0, grad_accum_steps=accum)
    mem = program_memory(fn.lower(setup.abstract_state, batch, key, q_abs).compile()
                         .memory_analysis())
    out.append((f'{first}..{last}' if first != last else f'{first}', mem))
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    args.depths, args.batch, args.top_k = '1', 2, smoke_configs.TOP_K
  from mvar_jax import compilation_cache
  compilation_cache.enable()
  gib = lambda b: f'{b / 2**30:8.2f}'
  dev = jax.devices()[0]
  rows = []
  for depth in (int(d) for d in args.depths.split(',')):
    for mode in args.modes.split(','):
      t0 = time.time()
      tok, v_abs, model, t_abs = build(args, depth, mode)
      s = sampler_mem(args, tok, v_abs, model, t_abs)
      parts = ('', '')
      if not args.skip_parts:
        parts = (gib(decoder_mem(args, tok, v_abs).peak),
                 gib(last_scale_mem(args, model, t_abs).peak) if mode == 'mvar' else f'{"":>8}')
      tr, seg = (None, '')
      if not args.skip_train:
        tr, seg = train_mem(args, model, t_abs)
      rows.append((depth, mode.upper(), s, parts, tr, seg))
      print(f'# d{depth} {mode}: compiled in {time.time() - t0:.0f} s', flush=True)

  print(f'\n# jax {jax.__version__}, compiled for {dev.platform} ({dev.device_kind}); '
        f'{args.res} px, batch {args.batch}, cfg {args.cfg}, top-k {args.top_k}, '
        f'sampling params {args.param_dtype}, compute {build(args, 1, "mvar")[2].config.dtype}'
        if not args.smoke else f'\n# smoke, compiled for {dev.platform}')
  print('# GiB from compiled.memory_analysis(): peak = args + out + temp - alias')
  header = (f'{"model":<10}{"sample args":>12}{"temp":>8}{"peak":>8}{"paper GB":>9}'
            f'{"decoder":>9}{"last sc.":>9}{"train peak":>11}  {"(segment)":<10}')
  print(header)
  print('-' * len(header))
  by = {}
  for depth, mode, s, parts, tr, seg in rows:
    paper = PAPER_GB.get((mode, depth))
    paper = f'{paper:9.1f}' if paper and args.res == 256 and args.batch == 32 else f'{"":>9}'
    tr_s = gib(tr.peak) if tr else f'{"":>8}'
    print(f'{mode + "-d" + str(depth):<10}{gib(s.args):>12}{gib(s.temp)}{gib(s.peak)}{paper}'
          f'{parts[0]:>9}{parts[1]:>9}{tr_s:>11}  {seg:<10}')
    by[(mode, depth)] = s.peak
  for depth in sorted({d for d, *_ in rows}):
    if ('VAR', depth) in by and ('MVAR', depth) in by:
      print(f'# d{depth}: VAR / MVAR sampling peak = {by[("VAR", depth)] / by[("MVAR", depth)]:.2f}x'
            + (' (paper 2.9x)' if depth == 16 else ''))
  if args.grad_accum_steps:
    print(f'\n# the trainer\'s step (train.compile_train_step), batch {args.batch} on one device, '
          'GiB peak per segment')
    for depth in (int(d) for d in args.depths.split(',')):
      for accum in (int(a) for a in args.grad_accum_steps.split(',')):
        segs = trainer_step_mem(args, depth, accum)
        print(f'd{depth} micro-batches {accum} (of {args.batch // accum}): ' + ', '.join(
            f'scales {name} {gib(m.peak).strip()} (temp {gib(m.temp).strip()})'
            for name, m in segs), flush=True)


if __name__ == '__main__':
  main()
