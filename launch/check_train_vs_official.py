r"""Our trainer against the official MVAR and VAR trainers: same weights and batches, each step.

  python launch/check_train_vs_official.py --official_mvar_src=/path/to/MVAR   # CPU, ~40 s
  python launch/check_train_vs_official.py --family=var --official_var_src=/path/to/VAR
  python launch/check_train_vs_official.py ... --smoke                          # tiny pyramid

Builds the official model (from a checkout of CVL-UESTC/MVAR or FoundationVision/VAR that you
provide; nothing of theirs is copied here), moves every weight off the init by --perturb noise
(at the init the AdaLN gates are ~0 and the blocks get almost no gradient), converts the
weights with mvar_jax.convert, and trains both for --steps iterations on the same batches of
token ids:

  official  mvar: `MVARTrainer.train_one_ep_ratio_k` as `train.py` drives it (`lr_wd_annealing`
            every iteration, the `cur_prog` segment rule, `train_step`); var: `VARTrainer.
            train_step` after `lr_wd_annealing`, as VAR's `train_one_ep` calls them without
            progressive training (its default). Both: label-smoothed CE weighted 1/L,
            `AmpOptimizer` (clip, then torch AdamW over `filter_params`' groups, the no-decay
            keys read from the checkout's train.py);
  ours      `train.build` / `init_state` / `compile_train_step` / `segment_at` and
            `optim.make_optimizer`, the pieces `train.train_and_evaluate` runs, on one device
            (VAR: attention_mode 'var', train.schedule 'all').

Both in fp32 on CPU (the official code without autocast), stochastic depth and class dropout
off (their random streams cannot match across frameworks). The teacher inputs come from each
side's own quantiser (ours inside the step). The weight decay, its cosine end and the clip are
set so that each shows within a few steps.

Printed per step: the segment, the lr, both pre-clip gradient norms, and the largest
parameter difference against the largest change since the start. Elements whose AdamW
denominator has come within 10x of eps (gradients ~1e-9, where the update follows their
rounding) are counted and left out of the difference. Exit code 1 when a step differs by more
than --tolerance of the change (plus 8 fp32 ulps of the largest weight), or a gradient norm by
more than that fraction. Each of these planted in our trainer fails the check: no label
smoothing, a no-decay parameter decayed, a constant instead of annealed weight decay, no
clip, a parameter moved by a segment that does not read it.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import datetime
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


# (family, smoke) -> a clip among the pre-clip gradient norms of that run at depth 2 (their
# ranges: mvar 0.15-0.19, smoke 0.36-0.47; var 0.27-0.30, smoke 0.55-0.61).
DEFAULT_CLIP = {('mvar', False): 0.17, ('mvar', True): 0.4, ('var', False): 0.29,
                ('var', True): 0.57}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--family', choices=('mvar', 'var'), default='mvar',
                 help="mvar: the MVAR trainer's segment loop against ours; var: the VAR "
                      "trainer's step against ours in VAR mode (train.schedule='all')")
  p.add_argument('--official_mvar_src', default='', help='checkout of CVL-UESTC/MVAR')
  p.add_argument('--official_var_src', default='', help='checkout of FoundationVision/VAR')
  p.add_argument('--depth', type=int, default=2, help='official builder: width 64 * depth')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--steps', type=int, default=8)
  p.add_argument('--ratio_k', type=int, default=2, help='segment-A iterations per cycle')
  p.add_argument('--tblr', type=float, default=0.064, help='base lr; peak = tblr * batch / 256')
  p.add_argument('--warmup_steps', type=int, default=2)
  # Larger than the trainers' 0.05 and 2.0 so that each shows in a few steps: a decayed
  # parameter that should not be (or the reverse) moves by ~1% of the change since the start;
  # the default clip sits among the gradient norms of the run (DEFAULT_CLIP).
  p.add_argument('--weight_decay', type=float, default=0.5)
  p.add_argument('--weight_decay_end', type=float, default=0.1, help='cosine-annealed to this')
  p.add_argument('--grad_clip', type=float, default=None,
                 help='global-norm clip (default: DEFAULT_CLIP, some steps clip, some not)')
  p.add_argument('--label_smoothing', type=float, default=0.1)
  p.add_argument('--adam_eps', type=float, default=1e-8, help="AdamW's eps, both sides")
  p.add_argument('--perturb', type=float, default=0.05,
                 help='std of the noise added to every official weight before converting: at '
                      'the init the AdaLN gates are ~0 and the blocks get no gradient to speak of')
  p.add_argument('--grad_accum_steps', type=int, default=1,
                 help='ours only: the batch as this many micro-batches (train.grad_accum_steps); '
                      'the official step takes it whole')
  p.add_argument('--tolerance', type=float, default=5e-3,
                 help='largest parameter difference allowed, relative to the largest change '
                      'since the start, plus 8 fp32 ulps of the largest parameter')
  p.add_argument('--smoke', action='store_true', help='pyramid (1, 2, 3, 4, 6), depth 1')
  p.add_argument('--na2d_fallback', default='sdpa', choices=('sdpa', 'flex'),
                 help='na2d when natten is not installed (see launch/natten_fallback.py)')
  args = p.parse_args(argv)
  if not getattr(args, f'official_{args.family}_src'):
    p.error(f'--family={args.family} needs --official_{args.family}_src')
  if args.grad_clip is None:
    args.grad_clip = DEFAULT_CLIP[args.family, args.smoke]
  return args


# ============================================================================= official side

def _stub_missing_imports(notes: list) -> None:
  """The trainer module imports what it uses only for its command line, logs and image grids."""
  try:
    import pytz  # noqa: F401
  except ImportError:
    sys.modules['pytz'] = types.SimpleNamespace(timezone=lambda name: datetime.timezone.utc)
    notes.append('pytz stubbed (log timestamps)')
  try:
    import tap  # noqa: F401  (typed-argument-parser: the official command-line Args class)
  except ImportError:
    sys.modules['tap'] = types.SimpleNamespace(Tap=type('Tap', (), {}))
    notes.append('tap stubbed (command-line parsing)')
  try:
    import torchvision.utils  # noqa: F401
  except Exception:  # noqa: BLE001 -- absent, or built for another torch
    for name in ('torchvision', 'torchvision.utils'):
      sys.modules[name] = types.ModuleType(name)
    sys.modules['torchvision.utils'].make_grid = None
    sys.modules['torchvision'].utils = sys.modules['torchvision.utils']
    notes.append('torchvision stubbed (image grids)')


def import_trainer(src: str, notes: list):
  """(trainer, amp_sc, lr_control) modules of the checkout."""
  import importlib
  _stub_missing_imports(notes)
  sys.path.insert(0, src)
  try:
    return tuple(importlib.import_module(m) for m in ('trainer', 'utils.amp_sc',
                                                       'utils.lr_control'))
  finally:
    sys.path.remove(src)


def official_no_decay_keys(src: str) -> set:
  """The `nowd_keys` set literal that the checkout's train.py gives `filter_params`."""
  with open(os.path.join(src, 'train.py')) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == 'nowd_keys':
      return set(ast.literal_eval(node.value))
  raise SystemExit(f'{src}/train.py: no filter_params(nowd_keys=...) call found')


@contextlib.contextmanager
def _print_accepting_force():
  """The official code prints with force=True, a keyword its distributed set-up adds."""
  original = builtins.print
  builtins.print = lambda *a, force=False, **k: original(*a, **k)
  try:
    yield
  finally:
    builtins.print = original


class _Quiet:
  """Stands in for the TensorBoard logger."""

  def __getattr__(self, name):
    return lambda *a, **k: None


class _Recorder:
  """Per official step: (token span, pre-clip grad norm, state dict, 1.0 where an element's
  AdamW denominator sqrt(v_hat) has been in (0, 10 eps) so far)."""

  def __init__(self, model, opt, eps: float):
    import numpy as np
    self.model, self.opt, self.eps = model, opt, eps
    self.named = dict(model.named_parameters())
    self.beta2 = {p: g['betas'][1] for g in opt.param_groups for p in g['params']}
    self.near_eps = {k: np.zeros(p.shape, bool) for k, p in self.named.items()}
    self.log = []

  def __call__(self, span, grad_norm):
    import numpy as np
    for k, p in self.named.items():
      st = self.opt.state.get(p)
      if st:
        v_hat = st['exp_avg_sq'].numpy() / (1 - self.beta2[p] ** float(st['step']))
        self.near_eps[k] |= (v_hat > 0) & (np.sqrt(v_hat) < 10 * self.eps)
    self.log.append((tuple(span), float(grad_norm),
                     {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()},
                     {k: m.astype(np.float32) for k, m in self.near_eps.items()}))


def _official_optimizer(args, src: str, model, amp_sc, lr_control):
  """(torch AdamW, AmpOptimizer) as the checkout's train.py builds them, fp32 (no scaler)."""
  import torch
  for m in model.modules():  # stochastic depth off (timm DropPath)
    if hasattr(m, 'drop_prob'):
      m.drop_prob = 0.0
  model.cond_drop_rate = 0.0
  for p in model.parameters():
    p.requires_grad_(True)
  names, paras, groups = lr_control.filter_params(model, nowd_keys=official_no_decay_keys(src))
  opt = torch.optim.AdamW(groups, lr=_peak_lr(args), weight_decay=0, betas=(0.9, 0.95),
                          eps=args.adam_eps, fused=False)
  return opt, amp_sc.AmpOptimizer(mixed_precision=0, optimizer=opt, names=names, paras=paras,
                                  grad_clip=args.grad_clip, n_gradient_accumulation=1)


def _peak_lr(args) -> float:
  return args.tblr * args.batch / 256  # the official linear scaling rule


def _run_args(args):
  """The fields of the official command-line Args that its training loops read."""
  return types.SimpleNamespace(
      ep=1, wp=args.warmup_steps / args.steps, sche='lin0', tlr=_peak_lr(args),
      twd=args.weight_decay, twde=args.weight_decay_end, wp0=0.005, wpe=0.1, ac=1, pg=0.0,
      pgwp=1.0, device='cpu', tclip=args.grad_clip, cur_it='', cur_lr=0.0, cur_wd=0.0)


def run_official_mvar(args, setup, vae, model, batches, notes):
  """The official MVAR loop, `MVARTrainer.train_one_ep_ratio_k` on cached batches."""
  import torch
  src = args.official_mvar_src
  trainer_mod, amp_sc, lr_control = import_trainer(src, notes)
  opt, amp_opt = _official_optimizer(args, src, model, amp_sc, lr_control)
  trainer = trainer_mod.MVARTrainer(
      device='cpu', patch_nums=setup.patch_nums, resos=tuple(16 * p for p in setup.patch_nums),
      mvar_wo_ddp=model, mvar=model, mvar_opt=amp_opt, label_smooth=args.label_smoothing,
      refine_step=setup.refine_step, vae_local=vae, total_iters=args.steps,
      warmup_iters=args.warmup_steps)
  record, step_fn = _Recorder(model, opt, args.adam_eps), trainer.train_step

  def recorded(**kw):
    grad_norm, scale = step_fn(**kw)
    record((kw['L_bg'], kw['L_ed']), grad_norm)
    return grad_norm, scale

  trainer.train_step = recorded
  # The epoch's end syncs its metric meters through a CUDA tensor: no-op on one CPU process.
  trainer_mod.misc.MetricLogger.synchronize_between_processes = lambda self: None
  data = iter([(torch.from_numpy(b['ids']).long(), b['teacher'],
                torch.from_numpy(b['label']).long()) for b in batches])
  trainer.train_one_ep_ratio_k(ep=0, is_first_ep=False, start_it=0, args=_run_args(args),
                               tb_lg=_Quiet(), ld_or_itrt=data, iters_train=args.steps,
                               ratio_k=args.ratio_k, use_cached=True)
  return record.log


def run_official_var(args, setup, vae, model, batches, notes):
  """The official VAR step, `VARTrainer.train_step`, after `lr_wd_annealing`, as VAR's
  train.py `train_one_ep` calls them without progressive training (its default, pg=0; that
  loop itself sits in train.py beside the image-folder data code). The step tokenises its
  images with the VQ-VAE: `img_to_idxBl` hands it each batch's token ids instead."""
  import torch
  src = args.official_var_src
  trainer_mod, amp_sc, lr_control = import_trainer(src, notes)
  opt, amp_opt = _official_optimizer(args, src, model, amp_sc, lr_control)
  trainer = trainer_mod.VARTrainer(
      device='cpu', patch_nums=setup.patch_nums, resos=tuple(16 * p for p in setup.patch_nums),
      vae_local=vae, var_wo_ddp=model, var=model, var_opt=amp_opt,
      label_smooth=args.label_smoothing)
  record, run = _Recorder(model, opt, args.adam_eps), _run_args(args)
  sizes = [p * p for p in setup.patch_nums]
  quiet_metrics = types.SimpleNamespace(log_iters=set(), update=lambda **k: None)
  for g_it, b in enumerate(batches):
    ids = list(torch.from_numpy(b['ids']).long().split(sizes, dim=1))
    vae.img_to_idxBl = lambda *a, ids=ids, **k: ids
    lr_control.lr_wd_annealing(run.sche, opt, run.tlr, run.twd, run.twde, g_it,
                               run.wp * args.steps, run.ep * args.steps, wp0=run.wp0,
                               wpe=run.wpe)
    grad_norm, _ = trainer.train_step(
        it=g_it, g_it=g_it, stepping=True, metric_lg=quiet_metrics, tb_lg=_Quiet(),
        inp_B3HW=torch.zeros(args.batch, 3, 1, 1), label_B=torch.from_numpy(b['label']).long(),
        prog_si=-1, prog_wp_it=run.pgwp * args.steps)
    record((0, sum(sizes)), grad_norm)
  return record.log


# ============================================================================= our side

def our_config(args, setup, t_cfg):
  """configs/common.py with the converted architecture and the check's hyper-parameters."""
  from configs import common
  c = common.get_config()
  m, t = c.model, c.train
  for field in ('depth', 'width', 'num_heads', 'mlp_ratio', 'num_classes', 'vocab_size', 'cvae'):
    m[field] = getattr(t_cfg, field)
  m.patch_nums, m.refine_step, m.kernel_size = (setup.patch_nums, setup.refine_step,
                                                 setup.kernel_size)
  m.drop_path_rate, m.cond_drop_rate, m.dtype = 0.0, 0.0, 'float32'
  m.attention_mode = args.family
  t.schedule = 'segments' if args.family == 'mvar' else 'all'  # VAR: the whole pyramid
  t.batch_size, t.ratio_k, t.tblr = args.batch, args.ratio_k, args.tblr
  t.grad_accum_steps = args.grad_accum_steps
  t.epochs, t.steps_per_epoch = 1.0, args.steps
  t.warmup_epochs = args.warmup_steps / args.steps
  t.lr_schedule, t.warmup_start, t.lr_end = 'lin0', 0.005, 0.1
  t.weight_decay, t.weight_decay_end = args.weight_decay, args.weight_decay_end
  t.grad_clip, t.label_smoothing, t.eps = args.grad_clip, args.label_smoothing, args.adam_eps
  c.data.num_classes = t_cfg.num_classes
  c.mesh.data, c.mesh.num_devices = 1, 1
  return c


def run_ours(args, setup, tok, v_params, t_cfg, t_params, batches):
  """[(segment, pre-clip grad norm, params)] per step, and the lr schedule: our trainer's
  pieces on one device."""
  import jax
  import numpy as np
  from mvar_jax import optim, train
  config = our_config(args, setup, t_cfg)
  schedule = optim.Schedule.from_config(config, args.steps)
  built = train.build(config, schedule)
  state = train.init_state(built, jax.random.key(0), init_params=t_params)
  tok_params = jax.device_put({'quantize': v_params['quantize']}, built.replicated)
  tok_shardings = jax.tree_util.tree_map(lambda _: built.replicated, tok_params)
  fns, log = {}, []
  for step, b in enumerate(batches):
    seg = train.segment_at(step, schedule=config.train.schedule, num_scales=len(setup.patch_nums),
                           refine_step=setup.refine_step, ratio_k=args.ratio_k)
    if seg not in fns:
      fns[seg] = train.compile_train_step(built, tok, tok_shardings, first=seg[0], last=seg[1],
                                          label_smoothing=config.train.label_smoothing,
                                          ema_decay=config.train.ema_decay,
                                          grad_accum_steps=config.train.grad_accum_steps)
    batch = {'ids': b['ids'].astype(np.int32), 'label': b['label'].astype(np.int32)}
    state, metrics = fns[seg](state, batch, jax.random.key(step), tok_params)
    log.append((seg, float(metrics['grad_norm']), jax.device_get(state['params'])))
  return log, schedule.lr(config)


# ============================================================================= the run

def make_batches(args, setup, vae):
  """Random token ids and labels per step; for MVAR also the official quantiser's teacher
  input (the VAR step makes its own)."""
  import numpy as np
  import torch
  rng = np.random.default_rng(0)
  sizes = [p * p for p in setup.patch_nums]
  out = []
  for _ in range(args.steps):
    ids = rng.integers(0, setup.vocab, (args.batch, sum(sizes)))
    per_scale = torch.from_numpy(ids).long().split(sizes, dim=1)
    teacher = None
    if args.family == 'mvar':
      with torch.no_grad():
        teacher = vae.quantize.idxBl_to_mvar_input(list(per_scale)).float()
    out.append({'ids': ids, 'label': rng.integers(0, setup.num_classes, (args.batch,)),
                'teacher': teacher})
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np
  import torch
  import bench_vs_official as bench
  from mvar_jax import convert
  jax.config.update('jax_default_matmul_precision', 'highest')
  torch.manual_seed(0)
  bench_args = argparse.Namespace(
      smoke=args.smoke, depth=args.depth, official_mvar_src=args.official_mvar_src,
      official_var_src=args.official_var_src, na2d_fallback=args.na2d_fallback,
      decoder_dtype='float32', implementation='auto')
  setup = bench.make_setup(bench_args)
  setup.device = 'cpu'
  vae, model = bench.build_official(setup, args.family)
  with torch.no_grad():
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():
      p.add_(args.perturb * torch.randn(p.shape, generator=g))
  notes = setup.notes
  real_natten = 'natten' in sys.modules and not getattr(sys.modules['natten'], '_MVAR_FALLBACK',
                                                        False)
  if args.family == 'mvar' and real_natten:
    # NATTEN has no CPU backward: the SDPA+mask op (the same function) for training.
    import natten_fallback
    type(model.blocks[0].attn).forward.__globals__['na2d'] = natten_fallback.na2d_sdpa
    notes.append('official na2d via torch SDPA+mask (natten has no CPU backward)')
  tok, v_params, our_model, t_params = bench.convert_to_ours(setup, vae, model, args.family)
  t_params = jax.device_get(t_params)
  batches = make_batches(args, setup, vae)
  start = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

  ours, lr_fn = run_ours(args, setup, tok, jax.device_get(v_params), our_model.config,
                         t_params, batches)
  with _print_accepting_force():
    run_official = run_official_mvar if args.family == 'mvar' else run_official_var
    official = run_official(args, setup, vae, model, batches, notes)
  if len(official) != len(ours):
    raise SystemExit(f'the official loop ran {len(official)} steps, ours {len(ours)}')

  as_ours = lambda sd: convert.state_dict_to_params(convert.extract_state_dict(sd), t_params,
                                                    'transformer')
  start_tree = as_ours(start)
  what = (f'official MVAR trainer vs ours: refine_step {setup.refine_step}, ratio_k '
          f'{args.ratio_k}' if args.family == 'mvar' else
          'official VAR trainer vs ours in VAR mode: the whole pyramid every step')
  accum = (f' (ours in {args.grad_accum_steps} micro-batches)' if args.grad_accum_steps > 1
           else '')
  print(f'{what}; depth {args.depth}, pyramid {setup.patch_nums}, batch {args.batch}{accum}, '
        f'clip {args.grad_clip}, label smoothing {args.label_smoothing}, '
        f'AdamW eps {args.adam_eps:g}, fp32 on CPU')
  if notes:
    import natten_fallback
    notes = [natten_fallback.describe(args.na2d_fallback) if n == 'na2d fallback' else n
             for n in notes]
    print('notes: ' + '; '.join(dict.fromkeys(notes)))
  print('| step | scales | lr | grad norm official | grad norm ours | clipped | '
        'max abs param diff | in | max abs change since start | diff / change | '
        'elements near eps |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  ok = True
  layout = our_model.config.layout
  for step, ((seg, our_norm, our_params), (span, off_norm, off_sd, near)) in enumerate(
      zip(ours, official)):
    if tuple(layout.span(*seg)) != tuple(span):
      raise SystemExit(f'step {step}: the official loop trained tokens {span}, ours scales '
                       f'{seg} (tokens {layout.span(*seg)})')
    off, near = as_ours(off_sd), as_ours(near)
    # Where AdamW's denominator is near eps the update follows the rounding of a near-zero
    # gradient (both sides compute the gradients to ~1e-5 of each tensor's largest):
    # those elements are counted, and left out of the comparison.
    diffs = jax.tree_util.tree_map_with_path(
        lambda path, a, b, m: (float(np.max(np.where(m > 0, 0, np.abs(np.asarray(a) - b)))),
                               jax.tree_util.keystr(path)),
        our_params, off, near)
    diff, where = max(jax.tree_util.tree_leaves(diffs, is_leaf=lambda x: isinstance(x, tuple)))
    left_out = sum(int(np.sum(m > 0)) for m in jax.tree_util.tree_leaves(near))
    change = max(float(np.max(np.abs(b - s))) for b, s in
                 zip(jax.tree_util.tree_leaves(off), jax.tree_util.tree_leaves(start_tree)))
    largest = max(float(np.max(np.abs(b))) for b in jax.tree_util.tree_leaves(off))
    # A change of a few ulps (the first warm-up steps) is itself mostly rounding.
    ok &= diff <= args.tolerance * change + 8 * np.finfo(np.float32).eps * largest
    ok &= abs(our_norm - off_norm) <= args.tolerance * off_norm
    scales = f'{seg[0]}..{seg[1]}' if seg[0] != seg[1] else f'{seg[0]}'
    clipped = 'yes' if off_norm > args.grad_clip > 0 else 'no'
    print(f'| {step} | {scales} | {float(lr_fn(step)):.3e} | {off_norm:.6f} | {our_norm:.6f} | '
          f'{clipped} | {diff:.2e} | `{where}` | {change:.2e} | {diff / max(change, 1e-30):.1e} '
          f'| {left_out} |')
  print(f'{"PASS" if ok else "FAIL"}: every step within {args.tolerance:g} of the change since '
        'the start (+ 8 fp32 ulps), gradient norms within the same fraction')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
