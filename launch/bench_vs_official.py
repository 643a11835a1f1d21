r"""Side by side with the official PyTorch code: same weights, one run, interleaved.

  python launch/bench_vs_official.py --official_mvar_src=/path/to/MVAR \
      --official_var_src=/path/to/VAR --depth=16 --batch=2             # CPU or GPU
  python launch/bench_vs_official.py --official_mvar_src=/path/to/MVAR ...  # MVAR rows only
  python launch/bench_vs_official.py ... --smoke                      # tiny models, any machine

Builds the official MVAR and VAR (checkouts of CVL-UESTC/MVAR and FoundationVision/VAR that
you provide; nothing of theirs is copied here) at --depth with their own initialisation, fills
the VQ-VAE their builder leaves uninitialised, converts the same weights with
mvar_jax.convert, then times, alternating contenders within every repetition:

  sampling   official MVAR, official VAR (KV cache), ours MVAR, ours VAR mode: class labels,
             cfg, top-k, top-p as given, the VQ-VAE decode to images included;
  training   one step per segment, forward + backward + AdamW (betas 0.9/0.95, wd 0.05):
             MVAR's segment A (scales 0..refine_step-1) and each later scale alone (the
             official schedule), and VAR's whole sequence under its block-causal mask.

The first call of each contender is reported apart (ours: tracing + XLA compile, or a load
from the persistent compilation cache); then --reps timed calls, medians reported. Peak
memory is measured per contender in a fresh subprocess (--memory): host RSS high-water on
CPU; torch.cuda.max_memory_allocated / JAX peak_bytes_in_use on GPU.

Precision: fp32 everywhere on CPU. On GPU the official code runs under torch.autocast as in
its demos (fp16 sampling; bf16 training, which needs no loss scaler), ours in bf16
(TransformerConfig.dtype) with fp32 parameters.

Missing optional imports of the official code are replaced and the table says so:
`natten` (its na2d, see launch/natten_fallback.py: --na2d_fallback=sdpa|flex) and
`huggingface_hub` (a mixin class only used for hub uploads). flash_attn / xformers are
optional in the official code itself; what it found is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

# JAX and torch share the GPU here: JAX must not grab 75% of it up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SAMPLERS = ('official MVAR', 'ours MVAR', 'official VAR', 'ours VAR mode')
# Extra contenders (not in the default list): ours MVAR with one option changed, to time the
# choice side by side: the FFN's fc1 + GELU (`TransformerConfig.ffn_implementation`), XLA
# passes writing q, k, v for the neighbourhood kernel (`AttentionConfig.fused_qkv=False`), the
# sampler compiled with XLA's Triton GEMMs (then the FFN's GELU is a pass of its own; without
# them cuBLAS folds it into fc1: launch/check_gemm_epilogues.py).
VARIANTS = {'ours MVAR (XLA FFN)': dict(ffn_implementation='xla'),
            'ours MVAR (Pallas FFN)': dict(ffn_implementation='pallas'),
            'ours MVAR (unfused qkv)': dict(fused_qkv=False),
            # XLA's own default: matmuls as Triton GEMMs (ours turns them off on GPUs:
            # sampling.compiler_options).
            'ours MVAR (Triton GEMM)': dict(xla_options={'xla_gpu_enable_triton_gemm': True}),
            # Two programs: the scales before 7 with Triton GEMMs, 7..9 and the decode without.
            'ours MVAR (Triton GEMM before scale 7)': dict(
                split_at_scale=7, xla_options={'xla_gpu_enable_triton_gemm': True},
                late_xla_options={'xla_gpu_enable_triton_gemm': False}),
            # The gaps between the ~2800 kernels of a call (~2.5 ms of 76 on an H100,
            # launch/results/h100_2026-11-27.md): programmatic dependent launch (a kernel
            # starts while the one before it drains), independent kernels of a CUDA graph run
            # concurrently, the decode's chunk loop unrolled into the graph.
            # CPU: one program without YNNPACK (before: the scales with many rows as a second
            # program with YNNPACK's matmuls, sampling.cpu_split). On GPUs the default itself.
            'ours MVAR (one program)': dict(xla_options={}),
            'ours MVAR (PDL)': dict(xla_options={'xla_gpu_enable_pdl': True}),
            'ours MVAR (concurrent graph regions)': dict(
                xla_options={'xla_gpu_graph_enable_concurrent_region': True}),
            'ours MVAR (graph loops unrolled)': dict(
                xla_options={'xla_gpu_command_buffer_unroll_loops': True})}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--official_mvar_src', default='',
                 help='checkout of CVL-UESTC/MVAR (without it: no MVAR rows)')
  p.add_argument('--official_var_src', default='',
                 help='checkout of FoundationVision/VAR (without it: no VAR rows)')
  p.add_argument('--depth', type=int, default=16)
  p.add_argument('--batch', type=int, default=2, help='images per sampling call')
  p.add_argument('--train_batch', type=int, default=2, help='images per training step')
  p.add_argument('--cfg', type=float, default=1.5)
  p.add_argument('--top_k', type=int, default=900)
  p.add_argument('--top_p', type=float, default=0.96)
  p.add_argument('--reps', type=int, default=3, help='timed calls per contender (median)')
  p.add_argument('--warmup', type=int, default=1, help='untimed calls after the first')
  p.add_argument('--stream', type=int, default=8,
                 help='sampling throughput: this many calls back to back per timing, one wait '
                      'at the end, as a sampling job runs them (0: off)')
  p.add_argument('--samplers', default='',
                 help='comma-separated subset of the four samplers to time (default: those of '
                      'the families whose checkout is given; memory: each pair holds its own '
                      'weights; d16 all four need ~8 GB of host RAM on CPU)')
  p.add_argument('--skip_sampling', action='store_true')
  p.add_argument('--skip_train', action='store_true')
  p.add_argument('--memory', action=argparse.BooleanOptionalAction, default=True,
                 help='peak memory per contender, each in a fresh subprocess')
  p.add_argument('--na2d_fallback', choices=('auto', 'sdpa', 'flex'), default='auto',
                 help="official MVAR's na2d when natten cannot be imported (launch/natten_fallback.py)")
  p.add_argument('--implementation', default='auto', help='our neighbourhood op')
  p.add_argument('--param_dtype', choices=('float32', 'bfloat16'), default='float32',
                 help="dtype of our sampler's transformer params (bfloat16: cast on the "
                      'host as api.load_pretrained does, half the argument memory, and the VQ-VAE '
                      "decode's conv params in its dtype: Tokenizer.cast_for_decode)")
  p.add_argument('--decoder_dtype', choices=('auto', 'float32', 'bfloat16'), default='auto',
                 help="our VQ-VAE decode dtype (auto: bfloat16 on GPU, as the official code's "
                      'fp16 autocast there; float32 on CPU)')
  p.add_argument('--trace_dir', default='',
                 help="memory probes of ours also trace one call (jax.profiler) and write "
                      '<contender>.trace.json.gz here: per-kernel device times')
  p.add_argument('--threads', type=int, default=0,
                 help='CPU threads for both torch and XLA (0: each its default); 1 gives '
                      'steadier numbers on a shared machine, where spinning thread pools suffer')
  p.add_argument('--smoke', action='store_true', help='tiny models: checks the script runs')
  p.add_argument('--json_out', default='')
  p.add_argument('--probe', default='', help=argparse.SUPPRESS)  # internal: one contender
  args = p.parse_args(argv)
  given = families_given(args)
  if not given:
    p.error('give --official_mvar_src, --official_var_src or both (the checkouts to compare with)')
  if not args.samplers:
    args.samplers = ','.join(n for n in SAMPLERS if family_of(n) in given)
  for name in args.samplers.split(','):
    which = family_of(name.strip())
    if which is not None and which not in given:
      p.error(f'--samplers: {name.strip()!r} needs --official_{which}_src')
  return args


def family_of(name: str) -> str | None:
  """'mvar' or 'var' for a sampler's name (variants are MVAR's), None for an unknown name."""
  for which, off_name, our_name in FAMILIES:
    if name in (off_name, our_name) or (which == 'mvar' and name in VARIANTS):
      return which
  return None


def families_given(args) -> tuple:
  """The families ('mvar', 'var') whose official checkout is given: only they are timed."""
  return tuple(w for w, src in (('mvar', args.official_mvar_src), ('var', args.official_var_src))
               if src)


# ============================================================================= official code

def _stub_huggingface_hub() -> bool:
  """The official models subclass PyTorchModelHubMixin only to push to the hub."""
  try:
    import huggingface_hub  # noqa: F401
    return False
  except ImportError:
    module = types.ModuleType('huggingface_hub')
    module.PyTorchModelHubMixin = type('PyTorchModelHubMixin', (), {})
    sys.modules['huggingface_hub'] = module
    return True


_OFFICIAL_TOP_LEVEL = ('models', 'utils', 'dist')  # both checkouts use these names


def import_official(src: str):
  """The `models` package of one checkout, imported so that the other's can follow."""
  if not os.path.isdir(os.path.join(src, 'models')):
    raise SystemExit(f'{src} has no models/ package: pass a checkout of the official repository')
  own = lambda k: k.split('.')[0] in _OFFICIAL_TOP_LEVEL
  saved = {k: sys.modules.pop(k) for k in list(sys.modules) if own(k)}
  sys.path.insert(0, src)
  try:
    return importlib.import_module('models')
  finally:
    sys.path.remove(src)
    for k in [k for k in sys.modules if own(k)]:
      del sys.modules[k]  # the loaded classes keep their modules alive
    sys.modules.update(saved)


def fill_vqvae_(vae, seed: int) -> None:
  """Deterministic values for the official VQ-VAE, which its builder leaves as torch.empty.

  Convs trunc-normal(0.02) (so activations stay O(1) through 30 layers), norms 1/0, biases
  0, codebook uniform(+-1/V) as VAR's VQ-VAE initialiser.
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if 'embedding' in name:
        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / p.shape[0])
      elif name.endswith('bias'):
        p.zero_()
      elif p.ndim == 1:
        p.fill_(1.0)
      else:
        p.copy_(torch.nn.init.trunc_normal_(torch.empty(p.shape), std=0.02, generator=g))


@dataclasses.dataclass
class Setup:
  args: argparse.Namespace
  device: str  # 'cpu' | 'cuda'
  patch_nums: tuple
  refine_step: int
  kernel_size: int
  num_classes: int
  vocab: int
  notes: list


def make_setup(args) -> Setup:
  import torch
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if args.smoke:
    return Setup(args, device, (1, 2, 3, 4, 6), refine_step=4, kernel_size=3, num_classes=10,
                 vocab=64, notes=[])
  return Setup(args, device, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), refine_step=8, kernel_size=7,
               num_classes=1000, vocab=4096, notes=[])


def build_official(setup: Setup, which: str):
  """(vae, transformer) of the official code, official init, VQ-VAE filled; eval mode."""
  import torch
  import natten_fallback
  args = setup.args
  if which == 'mvar':
    label = natten_fallback.install(args.na2d_fallback)
    if 'unavailable' in label and 'na2d fallback' not in setup.notes:
      setup.notes.append('na2d fallback')  # resolved to its label when the table is printed
  if _stub_huggingface_hub() and 'huggingface_hub stubbed' not in setup.notes:
    setup.notes.append('huggingface_hub stubbed')
  models = import_official(args.official_mvar_src if which == 'mvar' else args.official_var_src)
  kw = dict(device=setup.device, patch_nums=setup.patch_nums, V=setup.vocab,
            num_classes=setup.num_classes, depth=1 if args.smoke else args.depth,
            ch=32 if args.smoke else 160)
  torch.manual_seed(0)
  if which == 'mvar':
    vae, model = models.build_vae_mvar(kernel_size=setup.kernel_size,
                                       refine_step=setup.refine_step, **kw)
  else:
    vae, model = models.build_vae_var(**kw)
  fill_vqvae_(vae, seed=1)
  return vae.eval(), model.eval()


def convert_to_ours(setup: Setup, vae, model, mode: str, overrides: dict | None = None,
                    param_dtype: str = 'float32'):
  """(tokenizer, tok params, transformer module, params) from the official modules' weights."""
  import jax
  from mvar_jax import api, convert, transformer as tfm, vqvae
  from mvar_jax.attention import AttentionConfig
  on_gpu = setup.device == 'cuda'
  sd = lambda m: {k: v.detach().float().cpu().numpy() for k, v in m.state_dict().items()}
  v_cfg, v_params = convert.convert_vqvae(
      sd(vae), patch_nums=setup.patch_nums, precision='default' if on_gpu else 'highest')
  decoder_dtype = setup.args.decoder_dtype
  if decoder_dtype == 'auto':
    decoder_dtype = 'bfloat16' if on_gpu else 'float32'
  v_cfg = dataclasses.replace(v_cfg, decoder_dtype=decoder_dtype)
  overrides = overrides or {}
  attention = AttentionConfig(mode=mode, refine_step=setup.refine_step,
                              kernel_size=setup.kernel_size,
                              implementation=setup.args.implementation,
                              fused_qkv=overrides.get('fused_qkv', AttentionConfig.fused_qkv))
  t_cfg, t_params = convert.convert_transformer(
      sd(model), patch_nums=setup.patch_nums, attention=attention,
      dtype='bfloat16' if on_gpu else 'float32')
  t_cfg = dataclasses.replace(t_cfg,
                              ffn_implementation=overrides.get('ffn_implementation', 'auto'))
  # The transformer cast on the host, as api.load_pretrained(param_dtype=...) does: the
  # device then never holds its fp32 copy (the device peak is the sampler's, not the load's).
  to_dev = lambda t, dtype=None: jax.tree_util.tree_map(api.to_device(dtype), t)
  return (vqvae.Tokenizer(v_cfg), to_dev(v_params), tfm.MVARTransformer(t_cfg),
          to_dev(t_params, param_dtype))


# ============================================================================= contenders

@dataclasses.dataclass
class Contender:
  name: str
  kind: str  # 'sample' | 'train'
  run: callable  # one synchronised call
  framework: str  # 'torch' | 'jax'


def _torch_sync(device):
  import torch
  if device == 'cuda':
    torch.cuda.synchronize()


def official_samplers(setup: Setup, which: str):
  import torch
  args = setup.args
  vae, model = build_official(setup, which)
  labels = torch.arange(args.batch, device=setup.device) % setup.num_classes
  amp = torch.autocast('cuda', dtype=torch.float16, enabled=setup.device == 'cuda')

  def one():  # one call, queued (torch returns before the device is done)
    if which == 'mvar':
      f_hat = model.autoregressive_infer(B=args.batch, label_B=labels, g_seed=0, cfg=args.cfg,
                                         top_k=args.top_k, top_p=args.top_p)
      return vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
    return model.autoregressive_infer_cfg(B=args.batch, label_B=labels, g_seed=0, cfg=args.cfg,
                                          top_k=args.top_k, top_p=args.top_p)

  def run():
    with torch.inference_mode(), amp:
      img = one()
    _torch_sync(setup.device)
    return img

  def stream(n: int):
    """n calls back to back, one wait at the end (as a sampling job's loop runs)."""
    with torch.inference_mode(), amp:
      for _ in range(n):
        one()
    _torch_sync(setup.device)

  run.stream = stream
  return run, (vae, model)


def our_sampler(setup: Setup, official, mode: str, overrides: dict | None = None):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mvar_jax import sampling
  args = setup.args
  tok, v_params, model, t_params = convert_to_ours(setup, *official, mode, overrides,
                                                   param_dtype=args.param_dtype)
  if args.param_dtype != 'float32':
    v_params = tok.cast_for_decode(v_params)  # the decode's convs too (a no-op for fp32 decodes)
  labels = jnp.arange(args.batch, dtype=jnp.int32) % setup.num_classes
  key = jax.random.key(0)

  # Compiled once per process (or loaded from the compilation cache), as sampling.sample does.
  sampler = lambda: sampling.compile_sampler(
      model, t_params, tok, v_params, batch_size=args.batch, cfg=args.cfg, top_k=args.top_k,
      key=key, **{k: v for k, v in (overrides or {}).items()
                  if k in ('xla_options', 'split_at_scale', 'late_xla_options')})

  def run():
    out = sampler()(t_params, v_params, key=key, labels=labels, cfg=args.cfg, top_p=args.top_p)
    return jax.block_until_ready(out.images_BHW3)

  def stream(n: int):
    """n calls back to back, one wait at the end: sample mode's loop (the sampler compiled
    once, labels from the host, the next call dispatched before the last one's images are
    fetched), so the host's dispatch overlaps the device's work."""
    s, host_labels = sampler(), np.asarray(labels)
    outs = [s(t_params, v_params, key=key, labels=host_labels, cfg=args.cfg,
              top_p=args.top_p).images_BHW3 for _ in range(n)]
    jax.block_until_ready(outs)

  run.stream = stream
  # The program(s) `run` calls (loaded, not compiled again): memory and cost analyses, HLO.
  run.executable = lambda: _Programs(sampler())
  return run


class _Programs:
  """A CompiledSampler's programs as one for the probes: the larger memory analysis, the
  summed FLOPs, the HLO texts one after the other (a split sampler has two)."""

  def __init__(self, sampler):
    self._sampler = sampler

  def memory_analysis(self):
    return self._sampler.memory_analysis()

  def cost_analysis(self):
    flops = 0.0
    for program in self._sampler.programs:
      cost = program.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
      flops += float((cost or {}).get('flops', 0.0))
    return {'flops': flops}

  def as_text(self):
    return '\n'.join(program.as_text() or '' for program in self._sampler.programs)


def segments(setup: Setup, which: str):
  """(first, last) scale ranges of one training step each: the official schedule."""
  k = len(setup.patch_nums)
  if which == 'var':
    return [(0, k - 1)]
  return [(0, setup.refine_step - 1)] + [(s, s) for s in range(setup.refine_step, k)]


def _span(patch_nums, first, last):
  begin = sum(p * p for p in patch_nums[:first])
  return begin, begin + sum(p * p for p in patch_nums[first:last + 1])


def _train_data(setup: Setup, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  b, L = setup.args.train_batch, sum(p * p for p in setup.patch_nums)
  x = rng.standard_normal((b, L - 1, 32)).astype(np.float32)  # Cvae 32 in both builders
  gt = rng.integers(0, setup.vocab, (b, L)).astype(np.int64)
  labels = rng.integers(0, setup.num_classes, (b,)).astype(np.int64)
  return x, gt, labels


def official_train_steps(setup: Setup, which: str, official):
  import torch
  import torch.nn.functional as F
  _, model = official
  model.train()
  for p in model.parameters():
    p.requires_grad_(True)
  on_gpu = setup.device == 'cuda'
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                          fused=on_gpu)
  x, gt, labels = (torch.from_numpy(a).to(setup.device) for a in _train_data(setup))
  if which == 'mvar' and setup.device == 'cpu':
    # NATTEN 0.21 on CPU runs na2d through flex_attention, which has no CPU backward: the
    # official MVAR cannot train on CPU with it. Swap in the SDPA+mask op (same function).
    import natten_fallback
    na_globals = type(model.blocks[0].attn).forward.__globals__  # models/basic_mvar.py
    if not getattr(sys.modules.get('natten'), '_MVAR_FALLBACK', False):
      na_globals['na2d'] = natten_fallback.na2d_sdpa
      note = 'official MVAR training on CPU: na2d via torch SDPA+mask (natten has no CPU backward)'
      if note not in setup.notes:
        setup.notes.append(note)
  amp = torch.autocast('cuda', dtype=torch.bfloat16, enabled=on_gpu)
  first_l = setup.patch_nums[0] ** 2
  steps = []
  for first, last in segments(setup, which):
    lo, hi = _span(setup.patch_nums, first, last)

    def run(lo=lo, hi=hi, first=first):
      with amp:
        if which == 'var':
          logits = model(labels, x)
        else:
          logits = model(label_B=labels, x_BlCv_wo_first_l=x[:, max(0, lo - first_l):hi - first_l],
                         L_bg=lo, L_ed=hi, using_nattn=first >= setup.refine_step)
        loss = F.cross_entropy(logits.float().reshape(-1, setup.vocab), gt[:, lo:hi].reshape(-1))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      _torch_sync(setup.device)
      return loss

    steps.append(((first, last), run))
  return steps


def our_train_steps(setup: Setup, official, mode: str):
  import jax
  import jax.numpy as jnp
  import optax
  from mvar_jax import train
  _, _, model, params = convert_to_ours(setup, *official, mode)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  x, gt, labels = (jnp.asarray(a) for a in _train_data(setup))
  gt, labels = gt.astype(jnp.int32), labels.astype(jnp.int32)
  first_l = setup.patch_nums[0] ** 2
  state = {'params': params, 'opt': tx.init(params)}
  steps = []
  for first, last in segments(setup, 'var' if mode == 'var' else 'mvar'):
    lo, hi = _span(setup.patch_nums, first, last)

    def step(params, opt_state, rng, first=first, last=last, lo=lo, hi=hi):
      def loss_fn(p):
        logits = model.apply({'params': p}, labels, x[:, max(0, lo - first_l):hi - first_l],
                             first=first, last=last, train=True, rngs={'dropout': rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, gt[:, lo:hi]).mean()
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1),  # with the trainer's XLA options
                     compiler_options=dict(train.step_compiler_options()) or None)

    def run(jitted=jitted):
      state['params'], state['opt'], loss = jitted(state['params'], state['opt'],
                                                   jax.random.key(1))
      return jax.block_until_ready(loss)

    steps.append(((first, last), run))
  return steps


FAMILIES = (('mvar', 'official MVAR', 'ours MVAR'), ('var', 'official VAR', 'ours VAR mode'))


def _seg_name(first: int, last: int) -> str:
  return f'scales {first}..{last}' if first != last else f'scale {first}'


def sampling_contenders(setup: Setup, only: str = '') -> list[Contender]:
  """The four samplers (or the one named `only`); official weights built, ours converted."""
  out = []
  chosen = [n.strip() for n in setup.args.samplers.split(',')]
  unknown = sorted(set(chosen) - set(SAMPLERS) - set(VARIANTS))
  if unknown:
    raise SystemExit(f'--samplers: unknown {unknown}; choose from {SAMPLERS + tuple(VARIANTS)}')
  for which, off_name, our_name in FAMILIES:
    variants = [n for n in VARIANTS if which == 'mvar']
    family = (off_name, our_name, *variants)
    if only and only not in family:
      continue
    if not only and not set(family) & set(chosen):
      continue
    run, official = official_samplers(setup, which)
    wanted = lambda name: only == name or (not only and name in chosen)
    if wanted(off_name):
      out.append(Contender(off_name, 'sample', run, 'torch'))
    if wanted(our_name):
      out.append(Contender(our_name, 'sample', our_sampler(setup, official, which), 'jax'))
    for name in filter(wanted, variants):
      out.append(Contender(name, 'sample',
                           our_sampler(setup, official, which, VARIANTS[name]), 'jax'))
    del run, official  # a probe of ours keeps no torch model
  return out


def train_contenders(setup: Setup, which: str, only: str = '') -> list[Contender]:
  """One training step per segment, official and ours (a fresh official model: train mode)."""
  _, off_name, our_name = next(f for f in FAMILIES if f[0] == which)
  segs = segments(setup, which)
  off_names = [f'{off_name} train {_seg_name(*s)}' for s in segs]
  our_names = [f'{our_name} train {_seg_name(*s)}' for s in segs]
  official = build_official(setup, which)
  out = []
  if not only or only in our_names:
    for name, (_, run) in zip(our_names, our_train_steps(setup, official, which)):
      if not only or only == name:
        out.append(Contender(name, 'train', run, 'jax'))
  if not only or only in off_names:
    for name, (_, run) in zip(off_names, official_train_steps(setup, which, official)):
      if not only or only == name:
        out.append(Contender(name, 'train', run, 'torch'))
  # Interleave official and ours segment by segment so that the table reads in pairs.
  order = {n: i for i, n in enumerate(x for pair in zip(off_names, our_names) for x in pair)}
  return sorted(out, key=lambda c: order[c.name])


def all_names(setup: Setup) -> list[str]:
  names = [] if setup.args.skip_sampling else [
      n.strip() for n in setup.args.samplers.split(',')]
  if not setup.args.skip_train:
    for which, off_name, our_name in FAMILIES:
      if which not in families_given(setup.args):
        continue
      for s in segments(setup, which):
        names += [f'{off_name} train {_seg_name(*s)}', f'{our_name} train {_seg_name(*s)}']
  return names


# ============================================================================= measuring

def time_interleaved(contenders: list[Contender], reps: int, warmup: int,
                     failed: dict | None = None) -> dict:
  """{name: (first call s, [timed s])}; every repetition runs each contender once, in turn.

  A contender that raises (out of device memory, say) is dropped with its error in `failed`
  and the others go on: one contender's failure must not lose the others' figures.
  """
  failed = {} if failed is None else failed
  alive = list(contenders)
  first, times = {}, {c.name: [] for c in contenders}

  def attempt(c) -> bool:
    try:
      c.run()
      return True
    except Exception as e:  # noqa: BLE001
      failed[c.name] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
      print(f'# {c.name} failed, dropped: {failed[c.name]}', flush=True)
      alive.remove(c)
      times.pop(c.name)
      return False

  for c in list(alive):
    t = time.perf_counter()
    if attempt(c):
      first[c.name] = time.perf_counter() - t
      print(f'# first call {c.name}: {first[c.name]:.2f} s', flush=True)
  for _ in range(warmup):
    for c in list(alive):
      attempt(c)
  for r in range(reps):
    for c in list(alive):
      t = time.perf_counter()
      if attempt(c):
        times[c.name].append(time.perf_counter() - t)
    print(f'# rep {r + 1}/{reps}: ' + ', '.join(f'{n} {v[-1]:.3f}s' for n, v in times.items()),
          flush=True)
  return {c.name: (first[c.name], times[c.name]) for c in alive}


def time_streams(contenders: list[Contender], calls: int, reps: int) -> dict:
  """{name: [s per call]}: each rep runs `calls` back-to-back calls per contender (one wait
  at the end), contenders in turn. A latency figure (`time_interleaved`) includes the host's
  work before the device starts; a job sampling many batches hides it behind the last call."""
  out = {c.name: [] for c in contenders if getattr(c.run, 'stream', None)}
  for r in range(reps):
    for c in contenders:
      if c.name in out:
        t = time.perf_counter()
        c.run.stream(calls)
        out[c.name].append((time.perf_counter() - t) / calls)
    print(f'# streamed rep {r + 1}/{reps} ({calls} calls each): '
          + ', '.join(f'{n} {v[-1]:.4f}s/call' for n, v in out.items()), flush=True)
  return out


def _rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def probe_memory(setup: Setup, name: str) -> dict:
  """Peak memory of one contender (two calls), in this fresh process."""
  import torch
  if ' train ' in name:
    which = 'mvar' if name.startswith(('official MVAR', 'ours MVAR')) else 'var'
    contenders = train_contenders(setup, which, only=name)
  else:
    contenders = sampling_contenders(setup, only=name)
  if len(contenders) != 1:
    raise SystemExit(f'no contender named {name!r}')
  gc.collect()
  rss_before = _rss_bytes()
  if setup.device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  t = time.perf_counter()
  contenders[0].run()  # ours: loaded from the persistent compilation cache the main run filled
  first = time.perf_counter() - t
  contenders[0].run()
  res = {'rss_before': rss_before, 'rss_peak': _rss_bytes(), 'first_call_s': first}
  executable = getattr(contenders[0].run, 'executable', None)
  if executable is not None:
    compiled = executable()
    res.update(_program_figures(compiled))
    if setup.args.trace_dir:
      res['trace'] = _trace_one_call(contenders[0].run, setup.args.trace_dir, name)
      res['hlo'] = _write_hlo(compiled, setup.args.trace_dir, name)
  if setup.device == 'cuda':
    if contenders[0].framework == 'torch':
      res['device_peak'] = torch.cuda.max_memory_allocated()
    else:
      import jax
      res['device_peak'] = (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use')
  return res


def _program_figures(compiled) -> dict:
  """XLA's memory analysis (argument + output + temp - alias bytes) and counted FLOPs."""
  from bench_memory import program_memory
  out = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    m = program_memory(mem)
    out.update(program_bytes=m.peak, argument_bytes=m.args, temp_bytes=m.temp)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if cost and 'flops' in cost:
    out['xla_flops'] = float(cost['flops'])
  return out


def _write_hlo(compiled, trace_dir: str, name: str) -> str:
  """The compiled program's optimised HLO (what the trace's fusion names refer to), gzipped."""
  import gzip
  dest = os.path.join(trace_dir, _file_stem(name) + '.hlo.txt.gz')
  try:
    text = compiled.as_text()
  except Exception as e:  # noqa: BLE001  (a loaded executable may not keep its HLO)
    return f'unavailable: {e}'[:200]
  with gzip.open(dest, 'wt') as f:
    f.write(text or '')
  return dest


def _file_stem(name: str) -> str:
  """A contender's name as a file name: letters, digits, '_' (the device returns no others)."""
  return ''.join(ch if ch.isalnum() else '_' for ch in name).strip('_')


def _trace_one_call(run, trace_dir: str, name: str) -> str:
  """One call under jax.profiler.trace; its Chrome-trace file copied to trace_dir."""
  import glob
  import shutil
  import tempfile
  import jax
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      run()
    found = sorted(glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'), recursive=True))
    if not found:
      return 'no trace file written'
    os.makedirs(trace_dir, exist_ok=True)
    dest = os.path.join(trace_dir, _file_stem(name) + '.trace.json.gz')
    shutil.copyfile(found[-1], dest)
    return dest


def memory_in_subprocesses(args, names) -> dict:
  out = {}
  for name in names:
    argv = [sys.executable, os.path.abspath(__file__), f'--probe={name}', '--no-memory']
    for k, v in vars(args).items():
      if k in ('probe', 'memory', 'json_out'):
        continue
      if isinstance(v, bool):
        if v:
          argv.append(f'--{k}')
      else:
        argv.append(f'--{k}={v}')
    env = dict(os.environ)
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # a JAX probe's peak, not 75%
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith('PROBE ')), None)
    if line is None:
      out[name] = {'error': (proc.stderr.strip().splitlines() or ['no output'])[-1][:200]}
    else:
      out[name] = json.loads(line[len('PROBE '):])
    print(f'# memory {name}: {out[name]}', flush=True)
  return out


def device_line(setup: Setup) -> str:
  import jax
  import torch
  d = jax.devices()[0]
  torch_dev = torch.cuda.get_device_name(0) if setup.device == 'cuda' else (
      f'{torch.get_num_threads()} CPU threads')
  return (f'jax {jax.__version__} on {d.platform} ({d.device_kind}); torch {torch.__version__} on '
          f'{setup.device} ({torch_dev}); {os.cpu_count()} CPU cores; load average '
          f'{os.getloadavg()[0]:.1f} at the end')


def official_twin(name: str) -> str:
  """The official row an 'ours ...' row is compared with: 'ours MVAR train scale 8' ->
  'official MVAR train scale 8'; a sampler variant -> the official MVAR sampler."""
  if name in VARIANTS:
    return 'official MVAR'
  return name.replace('ours VAR mode', 'official VAR').replace('ours MVAR', 'official MVAR')


def ratio_to_official(name: str, rows: dict, median) -> str:
  """'0.24x' of an 'ours ...' row against its official twin in `rows` ({name: timings}), or
  against the official sampler that ran when its twin did not ('0.24x VAR'); '' if none."""
  if not name.startswith('ours'):
    return ''
  twin, mark = official_twin(name), ''
  if twin not in rows and 'train' not in name:  # e.g. only the official VAR sampler ran
    twin = next((t for t in ('official MVAR', 'official VAR') if t in rows), twin)
    mark = ' ' + twin.split()[-1]
  return f'{median(rows[name]) / median(rows[twin]):.2f}x{mark}' if twin in rows else ''


def print_table(setup: Setup, results: dict, memory: dict, failed: dict | None = None,
                streamed: dict | None = None):
  args = setup.args
  gib = lambda b: f'{b / 2**30:.2f}' if isinstance(b, (int, float)) and b else 'n/a'
  print(f'\n# {device_line(setup)}')
  print(f'# depth {args.depth if not args.smoke else 1}, sampling batch {args.batch} (cfg '
        f'{args.cfg}, top-k {args.top_k}, top-p {args.top_p}, VQ-VAE decode included), training '
        f'batch {args.train_batch}; median of {args.reps} interleaved reps after '
        f'{args.warmup} warm-up')
  import natten_fallback
  notes = [natten_fallback.describe(args.na2d_fallback) if n == 'na2d fallback' else n
           for n in setup.notes]
  if notes:
    print('# official code ran with: ' + '; '.join(notes))
  header = (f'{"contender":<44}{"median s":>10}{"min s":>9}{"first s":>9}{"vs official":>13}'
            f'{"peak RSS GiB":>14}{"device GiB":>12}{"program GiB":>13}{"1st s, new proc":>17}')
  print(header)
  print('-' * len(header))
  for name, (first, times) in results.items():
    med = statistics.median(times)
    ratio = ratio_to_official(name, results, lambda row: statistics.median(row[1]))
    label = name
    if name.startswith('official MVAR') and any('unavailable' in n for n in notes):
      label += ' *'
    mem = memory.get(name, {})
    print(f'{label:<44}{med:>10.3f}{min(times):>9.3f}{first:>9.2f}{ratio:>13}'
          f'{gib(mem.get("rss_peak")):>14}{gib(mem.get("device_peak")):>12}'
          f'{gib(mem.get("program_bytes")):>13}'
          f'{mem.get("first_call_s", float("nan")):>17.2f}')
  if any('unavailable' in n for n in notes):
    print(f'# * {next(n for n in notes if "unavailable" in n)}')
  if streamed:
    print(f'\n# streamed: {args.stream} calls back to back per timing, one wait at the end '
          '(as a sampling job); median of the timings, s per call')
    print(f'{"contender":<44}{"s per call":>11}{"images/s":>10}{"vs official":>13}')
    for name, per_call in streamed.items():
      med = statistics.median(per_call)
      ratio = ratio_to_official(name, streamed, statistics.median)
      print(f'{name:<44}{med:>11.4f}{args.batch / med:>10.1f}{ratio:>13}')
  for name, error in (failed or {}).items():
    print(f'# {name}: failed, no figures ({error})')
  print('# "vs official": our median / the official median (< 1: ours is faster; "x VAR": '
        'against the official VAR where its MVAR twin did not run). '
        'first s: first call (ours: compile, or load from the compilation cache); '
        '1st s, new proc: the first call in the memory probe, a fresh process started after '
        'the main run (ours: a persistent-cache load). program GiB: XLA memory_analysis of '
        'our sampler (arguments + outputs + temporaries).')
  print(f'# ours: {args.param_dtype} transformer params, VQ-VAE decode in {args.decoder_dtype} '
        '(auto: bfloat16 on GPU, float32 on CPU)')


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    args.top_k = min(args.top_k, 20)
    args.reps, args.warmup = min(args.reps, 2), 0
  if args.threads:  # before JAX starts its CPU client
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen='
                               f'{str(args.threads > 1).lower()} intra_op_parallelism_threads='
                               f'{args.threads}').strip()
  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  from mvar_jax import compilation_cache
  compilation_cache.enable()
  setup = make_setup(args)
  if args.probe:
    print('PROBE ' + json.dumps(probe_memory(setup, args.probe)), flush=True)
    return
  results, failed, streamed = {}, {}, {}
  # Phases keep at most one family's training state in memory (d16: ~5 GB a side).
  if not args.skip_sampling:
    contenders = sampling_contenders(setup)
    results.update(time_interleaved(contenders, args.reps, args.warmup, failed))
    if args.stream:
      streamed = time_streams([c for c in contenders if c.name in results], args.stream,
                              max(1, min(args.reps, 3)))
    del contenders
  if not args.skip_train:
    for which in families_given(args):
      gc.collect()
      if setup.device == 'cuda':  # torch's cached blocks are free memory JAX cannot use
        torch.cuda.empty_cache()
      contenders = train_contenders(setup, which)
      results.update(time_interleaved(contenders, args.reps, args.warmup, failed))
      del contenders
  memory = {}
  if args.memory:
    print_table(setup, results, memory, failed, streamed)  # in case the probes are cut short
    gc.collect()
    memory = memory_in_subprocesses(args, list(results))
  print_table(setup, results, memory, failed, streamed)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'device': device_line(setup), 'args': vars(args), 'notes': setup.notes,
                 'results': results, 'failed': failed, 'memory': memory,
                 'streamed': streamed}, f, indent=1)


if __name__ == '__main__':
  main()
