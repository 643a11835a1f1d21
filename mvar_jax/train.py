"""MVAR training: teacher-forced next-scale prediction over a frozen VQ-VAE's tokens.

    train_and_evaluate(config, workdir)     # configs/*.py; resumes from workdir/checkpoints

Read top to bottom: the segment schedule, the loss, the pure `train_step` /
`eval_step`, state creation and sharding, then the loop. The optimiser and its
schedules live in mvar_jax/optim.py, the data sources in mvar_jax/data/sources.py,
and what every long job needs (lock, checkpoints, preemption, NaN guard, writers,
exit codes) in mvar_jax/lifecycle.py.

Segments. The official trainer alternates `ratio_k` iterations on segment A
(scales 0..refine_step-1, one block-diagonal dense attention) with one iteration
per large scale (refine_step.., neighbourhood attention). Every iteration draws
its own batch and takes its own optimiser step; each segment is one compiled
step function (3 for the 256 px pyramid). `train.schedule='all'` instead trains
every scale in every step (one compiled function). Either way the loss is the
per-token cross entropy weighted 1/L (L = all tokens of the pyramid), summed
over the trained tokens and averaged over the batch, as upstream. A parameter a
segment does not read (`pos_start` after scale 0) is left alone in that step:
no update, no moment decay, no step count (torch's AdamW without a gradient).

Teacher forcing runs inside the jitted step: the batch carries int32 token ids
(B, L) (or images, encoded by the frozen VQ-VAE inside the step), and the
quantiser turns them into the teacher input (B, L-1, Cvae). Token ids are 32x
smaller than fp32 teacher inputs on the host->device path and in a token cache,
and the quantiser (codebook lookup, bicubic up, a 3x3 conv per scale, area
down; no encoder) is small next to the transformer.

Exact resume. Everything a step consumes is a pure function of (seed, step):
the global batch (see `sources.StepIndexedSource`), the dropout key
fold_in(seed, step), the segment, the learning rate. A checkpoint holds the state
plus the host-side metric accumulators of the current log window, so a run killed
and restarted writes the same numbers as one that never stopped.

NaN/Inf and preemption. The host runs at most one step ahead of the device: after
dispatching step s it waits for step s-1's metrics, checks its loss and adds it to
the log window. A non-finite loss stops the run naming the step; a state is saved
only if every float in it is finite (lifecycle.Run.save), so the checkpoint a
NaN message names is a good one. A SIGTERM is honoured at the end of the step in
progress: save, then lifecycle.Preempted (exit code lifecycle.EXIT_PREEMPTED).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mvar_jax import checkpointing, config_utils, lifecycle, optim, sample_mode, sharding, xla_cpu
from mvar_jax import transformer as tfm
from mvar_jax import vqvae as vq
from mvar_jax.data import sources
from mvar_jax.evaluation import evaluators
from mvar_jax.layout import ScaleLayout
from mvar_jax.optim import Schedule

NonFiniteLossError = lifecycle.NonFiniteError  # the name older callers catch


# ============================================================================= segments

def segments(schedule: str, num_scales: int, refine_step: int) -> list[tuple[int, int]]:
  """The (first, last) scale ranges one step can train: [A, refine_step, ..., K-1] or [all]."""
  if schedule == 'all':
    return [(0, num_scales - 1)]
  if refine_step >= num_scales:
    return [(0, num_scales - 1)]
  return [(0, refine_step - 1)] + [(s, s) for s in range(refine_step, num_scales)]


def segment_at(step: int, *, schedule: str, num_scales: int, refine_step: int,
               ratio_k: int) -> tuple[int, int]:
  """(first, last) trained at optimiser step `step` (0-based), as upstream's cur_prog rule.

  'segments': with c = step % (ratio_k + K - refine_step), segment A (scales
  0..refine_step-1) when c < ratio_k, else the large scale refine_step + c - ratio_k.
  Upstream writes the large scale as refine_step + c % ratio_k (c - 1 when ratio_k is 1):
  the same whenever K - refine_step <= ratio_k, as in all its configs; with more large
  scales than ratio_k it would train some twice per cycle and never the last ones.
  """
  if schedule == 'all' or refine_step >= num_scales:
    return 0, num_scales - 1
  c = step % (ratio_k + num_scales - refine_step)
  if c < ratio_k:
    return 0, refine_step - 1
  si = refine_step + c - ratio_k
  return si, si


# ============================================================================= loss and metrics

def cross_entropy(logits_BlV, targets_Bl, label_smoothing: float = 0.0):
  """(loss_Bl, nll_Bl): CE with torch's label smoothing ((1-e) one-hot + e/V), and plain NLL."""
  logits_BlV = logits_BlV.astype(jnp.float32)
  lse_Bl = jax.nn.logsumexp(logits_BlV, axis=-1)
  target_Bl = jnp.take_along_axis(logits_BlV, targets_Bl[..., None], axis=-1)[..., 0]
  nll_Bl = lse_Bl - target_Bl
  if label_smoothing == 0.0:
    return nll_Bl, nll_Bl
  # Uniform part: lse - mean(logits); no (B, l, V) one-hot is built.
  smooth_Bl = lse_Bl - jnp.mean(logits_BlV, axis=-1)
  return (1 - label_smoothing) * nll_Bl + label_smoothing * smooth_Bl, nll_Bl


def scale_metrics(nll_Bl, correct_Bl, weights_B, layout: ScaleLayout, first: int, last: int):
  """Per scale of the pyramid: (nll sum, correct sum, token count) over the weighted batch.

  Shapes (K,) with zeros for scales outside first..last, so steps of different
  segments add up.
  """
  k = layout.num_scales
  base = layout.begin(first)
  nll_K, corr_K, cnt_K = [jnp.zeros((k,), jnp.float32) for _ in range(3)]
  for si in range(first, last + 1):
    lo, hi = layout.begin(si) - base, layout.end(si) - base
    w = weights_B[:, None]
    nll_K = nll_K.at[si].set(jnp.sum(nll_Bl[:, lo:hi] * w))
    corr_K = corr_K.at[si].set(jnp.sum(correct_Bl[:, lo:hi] * w))
    cnt_K = cnt_K.at[si].set(jnp.sum(weights_B) * (hi - lo))
  return nll_K, corr_K, cnt_K


def teacher_forcing(batch, tokenizer: vq.Tokenizer, tok_params, layout: ScaleLayout):
  """(ids_BL int32, teacher_BlCv fp32 (B, L - pn0^2, Cvae)) from token ids or images."""
  if 'ids' in batch:
    ids_BL = batch['ids'].astype(jnp.int32)
    ids = layout.split(ids_BL, 0, layout.num_scales - 1)
  else:  # images in [-1, 1]: tokenise with the frozen VQ-VAE
    ids = tokenizer.img_to_ids(tok_params, batch['image'].astype(jnp.float32))
    ids_BL = jnp.concatenate(ids, axis=1)
  teacher_BlCv = tokenizer.ids_to_teacher_input(tok_params, ids)
  return ids_BL, jax.lax.stop_gradient(teacher_BlCv)


def _segment_inputs(ids_BL, teacher_BlCv, layout: ScaleLayout, first: int, last: int):
  """Targets (B, l) and the model input of scales first..last (None for scale 0 alone)."""
  begin, end = layout.span(first, last)
  first_l = layout.scale_len(0)
  x = teacher_BlCv[:, max(0, begin - first_l):end - first_l]
  return ids_BL[:, begin:end], (x if x.shape[1] else None)


# ============================================================================= steps

def segment_loss(params, batch, rng, tok_params, *, model: tfm.MVARTransformer,
                 tokenizer: vq.Tokenizer, first: int, last: int, label_smoothing: float = 0.0):
  """(loss, (nll_Bl, correct_Bl)) of scales first..last on one batch: the loss to differentiate.

  The per-token CE weighted 1/L (L = all tokens of the pyramid, upstream's loss_weight),
  summed over the segment's tokens and averaged over the batch.
  """
  layout = model.config.layout
  ids_BL, teacher_BlCv = teacher_forcing(batch, tokenizer, tok_params, layout)
  targets_Bl, x_BlCv = _segment_inputs(ids_BL, teacher_BlCv, layout, first, last)
  logits_BlV = model.apply({'params': params}, batch['label'].astype(jnp.int32), x_BlCv,
                           first=first, last=last, train=True, rngs={'dropout': rng})
  loss_Bl, nll_Bl = cross_entropy(logits_BlV, targets_Bl, label_smoothing)
  loss = jnp.mean(jnp.sum(loss_Bl, axis=1) / layout.total_len)
  correct_Bl = (jnp.argmax(logits_BlV, axis=-1) == targets_Bl).astype(jnp.float32)
  return loss, (nll_Bl, correct_Bl)


def microbatches(batch, k: int):
  """Each (B, ...) leaf as (k, B/k, ...): micro-batch j holds rows j, j + k, j + 2k, ...

  Strided rather than contiguous: a batch sharded in contiguous row blocks over the devices
  then gives every device B/(k * devices) rows of every micro-batch (no data moves).
  """
  def split(x):
    parts = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(parts, (None, 'activation_batch') + (None,) * (x.ndim - 1))
  return jax.tree_util.tree_map(split, batch)


def train_step(state, batch, rng, tok_params, *, model: tfm.MVARTransformer,
               tokenizer: vq.Tokenizer, tx: optax.GradientTransformation, first: int, last: int,
               label_smoothing: float = 0.0, ema_decay: float = 0.0, active=None,
               grad_accum_steps: int = 1):
  """One optimiser step on scales first..last; returns (state, metrics).

  state: {'params', 'opt_state', 'step', ['ema_params']}; batch: {'ids' (B, L) int32 or
  'image' (B, H, W, 3), 'label' (B,) int32}; rng: this step's dropout key; active: static
  tree of bools, the parameters this segment reads (None: all; see `segment_params`).
  grad_accum_steps: k > 1 runs the batch as k micro-batches of B/k one after the other
  (`microbatches`; micro-batch j's dropout key fold_in(rng, j)) and averages their gradients:
  the same update from ~1/k of the activation memory. Upstream's `--ac` differs: it sums the
  gradients of k iterations, each with its own batch and segment.
  """
  layout = model.config.layout
  grad_fn = jax.value_and_grad(
      functools.partial(segment_loss, model=model, tokenizer=tokenizer, first=first, last=last,
                        label_smoothing=label_smoothing), has_aux=True)
  weights = lambda b: jnp.ones(b['label'].shape[:1], jnp.float32)

  def one(b, key):
    (loss, (nll_Bl, correct_Bl)), grads = grad_fn(state['params'], b, key, tok_params)
    return loss, grads, scale_metrics(nll_Bl, correct_Bl, weights(b), layout, first, last)

  if grad_accum_steps == 1:
    loss, grads, (nll_K, corr_K, cnt_K) = one(batch, rng)
  else:
    def add(total, j_part):
      j, part = j_part
      return jax.tree_util.tree_map(jnp.add, total, one(part, jax.random.fold_in(rng, j))), None

    per_scale = lambda: jnp.zeros((layout.num_scales,), jnp.float32)
    zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state['params']),
            (per_scale(), per_scale(), per_scale()))
    (loss, grads, (nll_K, corr_K, cnt_K)), _ = jax.lax.scan(
        add, zero, (jnp.arange(grad_accum_steps), microbatches(batch, grad_accum_steps)))
    # Equal micro-batches: the batch mean is the mean of the micro-batch means.
    loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))
  if active is None:
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  else:
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'], active=active)
  params = optim.apply_updates(state['params'], updates, active)
  new_state = dict(state, params=params, opt_state=opt_state, step=state['step'] + 1)
  if 'ema_params' in state:
    new_state['ema_params'] = jax.tree_util.tree_map(
        lambda e, p: ema_decay * e + (1 - ema_decay) * p, state['ema_params'], params)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
             'nll_K': nll_K, 'correct_K': corr_K, 'count_K': cnt_K}
  return new_state, metrics


def eval_step(params, batch, tok_params, *, model: tfm.MVARTransformer, tokenizer: vq.Tokenizer):
  """Per-scale sums (nll, correct, count) over a batch, all scales in one call.

  Under scale-Markov attention the logits equal those of the segment-wise calls.
  batch['mask'] (B,) marks real rows of a padded last batch.
  """
  layout = model.config.layout
  k = layout.num_scales
  ids_BL, teacher_BlCv = teacher_forcing(batch, tokenizer, tok_params, layout)
  targets_BL, x = _segment_inputs(ids_BL, teacher_BlCv, layout, 0, k - 1)
  logits_BLV = model.apply({'params': params}, batch['label'].astype(jnp.int32), x,
                           first=0, last=k - 1, train=False)
  _, nll_BL = cross_entropy(logits_BLV, targets_BL)
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  weights_B = batch.get('mask', jnp.ones(targets_BL.shape[:1], jnp.float32)).astype(jnp.float32)
  nll_K, corr_K, cnt_K = scale_metrics(nll_BL, correct_BL, weights_B, layout, 0, k - 1)
  return {'nll_K': nll_K, 'correct_K': corr_K, 'count_K': cnt_K}


# ============================================================================= state and sharding

@dataclasses.dataclass
class Setup:
  """Everything the loop needs that is built once: model, optimiser, mesh and shardings."""

  model: tfm.MVARTransformer
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: dict
  abstract_state: dict  # ShapeDtypeStructs with shardings (for restore)
  batch_sharding: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding


def build(config, schedule: Schedule, mesh: jax.sharding.Mesh | None = None) -> Setup:
  """Model, optimiser and the shardings of the train state on the configured mesh."""
  model_cfg = config_utils.transformer_config_from(config).validate()
  model = tfm.MVARTransformer(model_cfg)
  tx = optim.make_optimizer(config, schedule)
  mesh = mesh or sharding.create_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  repl = sharding.replicated(mesh)

  boxed = jax.eval_shape(lambda: tfm.init_params(model_cfg, jax.random.key(0)))['params']
  param_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Adam moments live where their parameter lives; counts and other scalars are replicated.
  opt_shardings = optim.state_shardings(abstract_opt, param_shardings, repl)
  shardings = {'params': param_shardings, 'opt_state': opt_shardings, 'step': repl}
  abstract = {'params': abstract_params, 'opt_state': abstract_opt,
              'step': jax.ShapeDtypeStruct((), jnp.int32)}
  if config.train.ema_decay > 0:
    shardings['ema_params'] = param_shardings
    abstract['ema_params'] = abstract_params
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return Setup(model=model, tx=tx, mesh=mesh, rules=rules, state_shardings=shardings,
               abstract_state=abstract, batch_sharding=sharding.batch_sharding(mesh, rules),
               replicated=repl)


def init_state(setup: Setup, rng, init_params=None):
  """The initial state, born sharded: jit(init, out_shardings=...) never builds it whole.

  init_params: optional host (numpy) params to start from (fine-tuning from VAR).
  """
  cfg = setup.model.config
  with_ema = 'ema_params' in setup.state_shardings

  def make(params):
    state = {'params': params, 'opt_state': setup.tx.init(params), 'step': jnp.zeros((), jnp.int32)}
    if with_ema:
      state['ema_params'] = params
    return state

  if init_params is None:
    fn = lambda key: make(nn.unbox(tfm.init_params(cfg, key)['params']))
    return jax.jit(fn, out_shardings=setup.state_shardings)(rng)
  params = jax.device_put(init_params, setup.state_shardings['params'])
  return jax.jit(make, out_shardings=setup.state_shardings)(params)


# XLA:CPU's YNNPACK fusions limited to matmuls in the training step. With its default list
# YNNPACK also takes elementwise chains and reductions, and for those it wants every
# broadcast operand materialised at full size: the softmax's row sums become (B, H, Q, K)
# tensors written by single-threaded broadcast kernels (wrapped_broadcast, ~20 ms each for a
# (2, 16, 256, 680) one), and a logits matmul fused with its row max ran at 16 GF/s. With
# matmuls only, XLA's own loop fusions do the rest (the convolutions of an encoder in the step
# go to Eigen's multi-threaded ones too). d16, fp32, batch 2 on 2 cores, one process, the same
# step compiled both ways and interleaved: MVAR scale 9 6.04 against 6.63 s, VAR 19.50 against
# 20.54 s; no YNNPACK fusion at all: 8.45 and 23.08 s (launch/results/cpu_2026-11-27_ynn.md).
_CPU_STEP_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


def step_compiler_options(backend: str | None = None) -> tuple:
  """XLA options the training step compiles with on `backend` (default: JAX's), as items:
  `_CPU_STEP_OPTIONS` on an XLA:CPU that knows them, none elsewhere."""
  return xla_cpu.on_cpu(_CPU_STEP_OPTIONS, backend)


def compile_train_step(setup: Setup, tokenizer: vq.Tokenizer, tok_shardings, *, first: int,
                       last: int, label_smoothing: float, ema_decay: float,
                       grad_accum_steps: int = 1):
  """jit(train_step) for one segment: sharded in and out, the state donated."""
  fn = functools.partial(train_step, model=setup.model, tokenizer=tokenizer, tx=setup.tx,
                         first=first, last=last, label_smoothing=label_smoothing,
                         ema_decay=ema_decay, active=segment_params(setup, first, last),
                         grad_accum_steps=grad_accum_steps)
  return jax.jit(sharding.traced_on_mesh(fn, setup.mesh, setup.rules),
                 in_shardings=(setup.state_shardings, setup.batch_sharding, setup.replicated,
                               tok_shardings),
                 out_shardings=(setup.state_shardings, setup.replicated), donate_argnums=(0,),
                 compiler_options=dict(step_compiler_options()) or None)


def segment_params(setup: Setup, first: int, last: int):
  """Tree of bools: the parameters the forward of scales first..last reads (static)."""
  model = setup.model
  layout = model.config.layout
  begin, end = layout.span(first, last)
  label = jax.ShapeDtypeStruct((1,), jnp.int32)
  n_x = end - begin - (layout.scale_len(0) if first == 0 else 0)
  x = jax.ShapeDtypeStruct((1, n_x, model.config.cvae), jnp.float32) if n_x else None
  params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                  setup.abstract_state['params'])

  def forward(p, label_B, x_BlCv):
    return model.apply({'params': p}, label_B, x_BlCv, first=first, last=last, train=True,
                       rngs={'dropout': jax.random.key(0)})
  return optim.used_params(forward, params, label, x)


def compile_eval_step(setup: Setup, tokenizer: vq.Tokenizer, tok_shardings):
  fn = functools.partial(eval_step, model=setup.model, tokenizer=tokenizer)
  return jax.jit(sharding.traced_on_mesh(fn, setup.mesh, setup.rules),
                 in_shardings=(setup.state_shardings['params'], setup.batch_sharding,
                               tok_shardings),
                 out_shardings=setup.replicated)


# ============================================================================= tokenizer, weights

def load_tokenizer(config) -> tuple[vq.Tokenizer, dict]:
  """(Tokenizer, host params) from config.tokenizer.checkpoint, checked against config.model."""
  return load_tokenizer_for(config_utils.transformer_config_from(config),
                            config.tokenizer.checkpoint, decoder_dtype=decoder_dtype(config))


def decoder_dtype(config) -> str:
  """The VQ-VAE decode dtype of sampling: config.sample.decoder_dtype, else (auto) float32 on
  CPU, where bf16 convolutions are emulated (slower) and fp32 keeps samples bit-identical
  across device counts, and config.model.dtype on accelerators."""
  chosen = config.sample.get('decoder_dtype', '')
  if chosen:
    return chosen
  return 'float32' if jax.default_backend() == 'cpu' else config.model.dtype


def load_tokenizer_for(model_cfg: tfm.TransformerConfig, path: str, *,
                       decoder_dtype: str | None = None) -> tuple[vq.Tokenizer, dict]:
  """Tokenizer + host params of a converted dir (vqvae.msgpack/json) that fits `model_cfg`.

  decoder_dtype: overrides the stored VQVAEConfig.decoder_dtype (None: as stored).
  """
  cfg_dict, params = checkpointing.load_converted(path, 'vqvae')
  cfg = vq.VQVAEConfig(**{k: v for k, v in cfg_dict.items() if k != '_type'})
  if decoder_dtype is not None:
    cfg = dataclasses.replace(cfg, decoder_dtype=decoder_dtype)
  for name, want, got in (('model.vocab_size', model_cfg.vocab_size, cfg.vocab_size),
                          ('model.cvae', model_cfg.cvae, cfg.z_channels),
                          ('model.patch_nums', model_cfg.patch_nums, cfg.patch_nums)):
    if want != got:
      raise ValueError(f'{name} = {want} does not match the tokenizer in {path} ({got})')
  abstract = jax.eval_shape(lambda: vq.init_params(cfg, jax.random.key(0)))['params']
  checkpointing.check_tree_matches(params, nn.unbox(abstract), f'tokenizer {path}')
  return vq.Tokenizer(cfg), params


def load_init_params(config, abstract_params):
  """Host params of config.init_from (a converted VAR/MVAR transformer) that fit the model."""
  cfg_dict, params = checkpointing.load_converted(config.init_from, 'transformer')
  checkpointing.check_tree_matches(params, abstract_params, f'init_from {config.init_from}')
  logging.info('initialising from %s (depth %s, width %s)', config.init_from,
               cfg_dict.get('depth'), cfg_dict.get('width'))
  return params


# ============================================================================= metrics bookkeeping

class Accumulator:
  """Host-side sums over the steps of one log window (train) or one eval pass (JSON-able)."""

  def __init__(self, num_scales: int, state: Mapping[str, Any] | None = None):
    self.k = num_scales
    self.reset()
    if state:
      self.steps = int(state['steps'])
      self.loss, self.grad_norm = float(state['loss']), float(state['grad_norm'])
      for name in ('nll', 'correct', 'count'):
        setattr(self, name, np.asarray(state[name], np.float64))

  def reset(self):
    self.steps, self.loss, self.grad_norm = 0, 0.0, 0.0
    self.nll, self.correct, self.count = (np.zeros(self.k) for _ in range(3))

  def add(self, m: Mapping[str, np.ndarray]):
    self.steps += 1
    self.loss += float(m.get('loss', 0.0))
    self.grad_norm += float(m.get('grad_norm', 0.0))
    self.nll += np.asarray(m['nll_K'], np.float64)
    self.correct += np.asarray(m['correct_K'], np.float64)
    self.count += np.asarray(m['count_K'], np.float64)

  def state(self) -> dict:
    return {'steps': self.steps, 'loss': self.loss, 'grad_norm': self.grad_norm,
            'nll': self.nll.tolist(), 'correct': self.correct.tolist(),
            'count': self.count.tolist()}

  def summary(self, prefix: str, layout: ScaleLayout) -> dict[str, float]:
    """Mean loss / accuracy (%) per scale over the steps where that scale trained."""
    out = {}
    if prefix == 'train' and self.steps:
      out['train/loss'] = self.loss / self.steps
      out['train/grad_norm'] = self.grad_norm / self.steps
    for si, pn in enumerate(layout.patch_nums):
      if self.count[si] > 0:
        tag = f's{si:02d}_{pn}x{pn}'
        out[f'{prefix}_loss/{tag}'] = self.nll[si] / self.count[si]
        out[f'{prefix}_acc/{tag}'] = 100.0 * self.correct[si] / self.count[si]
    if prefix != 'train' and self.count.sum() > 0:
      # Mean over all tokens = the 1/L-weighted objective of a full pyramid.
      out[f'{prefix}/loss'] = self.nll.sum() / self.count.sum()
      out[f'{prefix}/acc'] = 100.0 * self.correct.sum() / self.count.sum()
    return out


# ============================================================================= the loop

def train_and_evaluate(config, workdir: str, *, step_hook: Callable[[int], None] | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Trains (resuming from `workdir/checkpoints` when it holds one); returns the final metrics.

  A finished run returns the final metrics stored with its last checkpoint and trains
  nothing. Raises lifecycle.Preempted after saving on SIGTERM, lifecycle.NonFiniteError
  on a NaN/Inf (naming the last good checkpoint), lifecycle.WorkdirLockedError when
  another run holds the workdir. step_hook(step) runs on the host after every step
  (tests use it to simulate a kill).
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config_utils.validate_config(config, check_mesh=mesh is None)
  layout = ScaleLayout(tuple(config.model.patch_nums))
  t = config.train

  # --------------------------------------------------------------- data and schedule
  expect = sources.token_expectation(config) if config.data.name == 'tokens' else None
  source = sources.make_train_source(config.data, int(t.batch_size), token_expect=expect)
  schedule = Schedule.from_config(config, source.steps_per_epoch)
  logging.info('schedule: %s', schedule)

  # --------------------------------------------------------------- mesh, model, tokenizer
  setup = build(config, schedule, mesh)
  tokenizer, tok_host = load_tokenizer(config)
  images = config.data.name != 'tokens'  # images are tokenised inside the step
  if images and tokenizer.config.resolution != config.data.image_size:
    raise ValueError(f'data.image_size={config.data.image_size} but the tokenizer expects '
                     f'{tokenizer.config.resolution} px images')
  # The quantiser alone turns ids into teacher inputs; the encoder is needed for images.
  tok_params = jax.device_put(tok_host if images else {'quantize': tok_host['quantize']},
                              setup.replicated)
  root = jax.random.key(config.seed)
  init_rng, dropout_root, sample_root = jax.random.split(root, 3)

  with lifecycle.Run(workdir, 'checkpoints', total_steps=schedule.total_steps,
                     max_to_keep=t.keep_checkpoints, async_save=t.async_checkpointing) as run:
    # ------------------------------------------------------------- state: resume or init
    window = Accumulator(layout.num_scales)
    restored = run.restore(setup.abstract_state)
    if restored is not None:
      state, meta = restored
      window = Accumulator(layout.num_scales, meta.get('window'))
      done = lifecycle.finished_metrics(meta)
      if int(meta['step']) >= schedule.total_steps and done is not None:
        logging.info('run in %s already finished at step %d; final metrics: %s', workdir,
                     int(meta['step']), done)
        print(f'finished run ({workdir}, step {int(meta["step"])}): ' + ', '.join(
            f'{k}={v:.4f}' for k, v in sorted(done.items())))
        return done
    else:
      init_params = None
      if config.init_from:
        init_params = load_init_params(config, setup.abstract_state['params'])
      state = init_state(setup, init_rng, init_params)
    step = int(jax.device_get(state['step']))
    logging.info('transformer: %.2fM params; mesh %s', tfm.count_params(state['params']) / 1e6,
                 dict(setup.mesh.shape))

    # ------------------------------------------------------------- steps
    tok_shardings = jax.tree_util.tree_map(lambda _: setup.replicated, tok_params)
    train_fns = {seg: compile_train_step(setup, tokenizer, tok_shardings, first=seg[0],
                                         last=seg[1], label_smoothing=t.label_smoothing,
                                         ema_decay=t.ema_decay,
                                         grad_accum_steps=t.get('grad_accum_steps', 1))
                 for seg in segments(t.schedule, layout.num_scales, config.model.refine_step)}
    eval_fn = compile_eval_step(setup, tokenizer, tok_shardings)
    lr_fn = schedule.lr(config)
    # Validation loss every train.eval_every steps; FID/IS every eval.fid_every when an
    # Inception network is configured (its sampler needs the whole tokenizer on device).
    fid_on = bool(config.get('eval') and config.eval.inception)
    evals = evaluators.from_config(
        config, model=setup.model, tokenizer=tokenizer,
        tok_params=jax.device_put(tok_host, setup.replicated) if fid_on else tok_params,
        eval_fn=lambda p, b: eval_fn(p, b, tok_params),
        eval_batches=lambda: (sharding.to_global_batch(local, setup.batch_sharding)
                              for local in sources.eval_batches(config)),
        workdir=workdir)

    # ------------------------------------------------------------- writers and hooks
    writer = run.writer
    if step == 0:
      writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                            if isinstance(v, (int, float, str, bool))})
    hooks = run.progress_hooks()
    if t.profile_steps > 0 and jax.process_index() == 0:
      from clu import periodic_actions
      hooks.append(periodic_actions.Profile(num_profile_steps=t.profile_steps, logdir=workdir))
    last_metrics: dict[str, float] = {}
    in_flight: list[tuple[int, dict]] = []  # dispatched steps whose metrics are unchecked

    def check(s: int, m: dict):
      """Stops on a non-finite loss, else adds the step's metrics to the log window."""
      m = jax.device_get(m)
      loss = float(m['loss'])
      if not np.isfinite(loss):
        raise lifecycle.NonFiniteError(
            f'training loss is {loss} (NaN/Inf) at step {s} (the update from step {s - 1} to '
            f'{s}); stopping without saving this state. Last good checkpoint: '
            f'{run.last_good()}')
      window.add(m)

    def drain():
      while in_flight:
        check(*in_flight.pop(0))

    def meta(**extra) -> dict:
      return dict(window=window.state(), config=config.to_json(), **extra)

    def evaluate(s: int, *, final: bool = False):
      drain()  # a NaN state is reported as such, not evaluated
      params = state['ema_params'] if 'ema_params' in state else state['params']
      last_metrics.update(evaluators.run_all(evals, params, s, writer, final=final))

    def write_samples(s: int):
      try:
        from mvar_jax import sampling
      except ImportError as e:  # the sampler is optional for training
        logging.warning('sampler unavailable (%s): no sample grid', e)
        return
      try:
        n = t.sample_images
        labels = jnp.arange(n, dtype=jnp.int32) % config.model.num_classes
        params = state['ema_params'] if 'ema_params' in state else state['params']
        out = sampling.sample(setup.model, {'params': params}, tokenizer,
                              jax.device_put(tok_host, setup.replicated),
                              key=jax.random.fold_in(sample_root, s), labels=labels,
                              cfg=config.sample.cfg, top_k=config.sample.top_k,
                              top_p=config.sample.top_p)
        grid = sample_mode.image_grid(np.asarray(jax.device_get(out.images_BHW3)))
        writer.write_images(s, {'samples': grid[None]})
      except Exception as e:  # noqa: BLE001 -- a failed preview must not stop training
        logging.exception('sampling at step %d failed: %s', s, e)

    # ------------------------------------------------------------- the loop
    logging.info('training from step %d to %d', step, schedule.total_steps)
    while step < schedule.total_steps:
      seg = segment_at(step, schedule=t.schedule, num_scales=layout.num_scales,
                       refine_step=config.model.refine_step, ratio_k=t.ratio_k)
      batch = sharding.to_global_batch(source.batch(step), setup.batch_sharding)
      rng = jax.random.fold_in(dropout_root, step)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = train_fns[seg](state, batch, rng, tok_params)
      step += 1
      in_flight.append((step, metrics))
      # Wait for the previous step: the host never runs more than one step ahead of the
      # device, so a stop request is honoured within one step, and a NaN is seen one
      # step after it happened (the device still has this step queued meanwhile).
      while len(in_flight) > 1:
        check(*in_flight.pop(0))
      for hook in hooks:
        hook(step)
      if step_hook is not None:
        step_hook(step)
      stop = run.should_stop(step)
      final = step == schedule.total_steps
      if step % t.log_every == 0 or final or stop:
        drain()
        if step % t.log_every == 0 or final:
          out = window.summary('train', layout)
          out['train/lr'] = float(lr_fn(step - 1))
          writer.write_scalars(step, out)
          last_metrics.update(out)
          window.reset()
      if final:  # evaluate first: the final metrics are kept with the last checkpoint
        evaluate(step, final=True)
        if t.sample_every and step % t.sample_every == 0:
          write_samples(step)
        drain()
        run.save(step, state, meta(final_metrics=last_metrics))
        break
      if step % t.checkpoint_every == 0 or stop:
        drain()  # never save a state whose losses were not checked
        run.save(step, state, meta())
      if stop:
        raise run.preempted(step)
      if evaluators.any_due(evals, step):
        evaluate(step)
      if t.sample_every and step % t.sample_every == 0:
        write_samples(step)
    if restored is not None and step >= schedule.total_steps and not last_metrics:
      # Finished before final metrics were kept (an older run): compute them now.
      evaluate(step, final=True)
      last_metrics.update(window.summary('train', layout))
  return last_metrics


def _flatten(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
