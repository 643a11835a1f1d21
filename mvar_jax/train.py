"""MVAR training: teacher-forced next-scale prediction over a frozen VQ-VAE's tokens.

    train_and_evaluate(config, workdir)     # configs/*.py; resumes from workdir/checkpoints

Read top to bottom: schedules and optimiser, the segment schedule, the loss, the
pure `train_step` / `eval_step`, state creation and sharding, data, then the loop.

Segments. The official trainer alternates `ratio_k` iterations on segment A
(scales 0..refine_step-1, one block-diagonal dense attention) with one iteration
per large scale (refine_step.., neighbourhood attention). Every iteration draws
its own batch and takes its own optimiser step; each segment is one compiled
step function (3 for the 256 px pyramid). `train.schedule='all'` instead trains
every scale in every step (one compiled function). Either way the loss is the
per-token cross entropy weighted 1/L (L = all tokens of the pyramid), summed
over the trained tokens and averaged over the batch, as upstream.

Teacher forcing runs inside the jitted step: the batch carries int32 token ids
(B, L) (or images, encoded by the frozen VQ-VAE inside the step), and the
quantiser turns them into the teacher input (B, L-1, Cvae). Token ids are 32x
smaller than fp32 teacher inputs on the host->device path and in a token cache,
and the quantiser (codebook lookup, bicubic up, a 3x3 conv per scale, area
down; no encoder) is small next to the transformer.

Exact resume. Everything a step consumes is a pure function of (seed, step):
the batch (see `StepIndexedSource`), the dropout key fold_in(seed, step), the
segment, the learning rate. A checkpoint holds the state plus the host-side
metric accumulators of the current log window, so a run killed and restarted
writes the same numbers as one that never stopped.

NaN/Inf. Per-step metrics stay on device until a log, checkpoint or eval step
(no per-step host sync); they are then checked in order, and the first
non-finite loss stops training with an error naming that step. Checkpoints are
written only after this check, so the newest checkpoint is always a good one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mvar_jax import checkpointing, config_utils, sharding
from mvar_jax import transformer as tfm
from mvar_jax import vqvae as vq
from mvar_jax.layout import ScaleLayout

# Substrings of parameter paths that get no weight decay (upstream's nowd_keys; the ones
# that name no parameter here are kept so the rule reads as upstream's).
NO_WEIGHT_DECAY_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed',
                        'pos_1LC', 'pos_start', 'start_pos', 'lvl_embed', 'gamma', 'beta',
                        'ada_gss', 'moe_bias', 'scale_mul')


# ============================================================================= schedules, optimiser

def lr_factor(step, *, kind: str, warmup_steps: int, total_steps: int, warmup_start: float,
              lr_end: float):
  """Multiplier of the peak lr at `step` (utils/lr_control.py `lr_wd_annealing`).

  Linear warm-up warmup_start -> 1 over warmup_steps, then over the rest
  (p = progress in [0, 1], 1 at the last step):
    lin0: 1 while p < 0.05, then linear to lr_end;  lin: the same with 0.15;
    lin00: linear 1 -> lr_end;  cos: half cosine 1 -> lr_end;  constant: 1.
  Works on Python ints, numpy and traced jnp values.
  """
  step = jnp.asarray(step, jnp.float32)
  wp = float(warmup_steps)
  warm = warmup_start + (1 - warmup_start) * step / max(wp, 1.0)
  p = (step - wp) / max(total_steps - 1 - wp, 1.0)
  rest = 1 - p
  if kind in ('lin0', 'lin'):
    hold = 0.05 if kind == 'lin0' else 0.15
    after = jnp.where(p < hold, 1.0, lr_end + (1 - lr_end) * rest / (1 - hold))
  elif kind == 'lin00':
    after = lr_end + (1 - lr_end) * rest
  elif kind == 'cos':
    after = lr_end + (1 - lr_end) * (0.5 + 0.5 * jnp.cos(math.pi * p))
  elif kind == 'constant':
    after = jnp.ones_like(p)
  else:
    raise ValueError(f'train.lr_schedule must be one of {config_utils.LR_SCHEDULES}, got {kind!r}')
  return jnp.where(step < wp, warm, after)


def weight_decay_value(step, *, weight_decay: float, weight_decay_end: float, total_steps: int):
  """Constant, or cosine-annealed weight_decay -> weight_decay_end over the run (upstream twde)."""
  if weight_decay_end < 0 or weight_decay_end == weight_decay:
    return jnp.full((), weight_decay, jnp.float32)
  p = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
  return weight_decay_end + (weight_decay - weight_decay_end) * (0.5 + 0.5 * jnp.cos(math.pi * p))


def decays(path: str, shape) -> bool:
  """Upstream's rule: no decay for 1-D params, biases and the NO_WEIGHT_DECAY_KEYS."""
  if len(shape) <= 1 or path.endswith('bias'):
    return False
  return not any(k in path for k in NO_WEIGHT_DECAY_KEYS)


def weight_decay_mask(params):
  """Tree of bools: True where AdamW decays the parameter."""
  def one(path, leaf):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
    return decays(name, np.shape(leaf))
  return jax.tree_util.tree_map_with_path(one, params)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Run length and learning-rate shape, resolved from the config and the data size."""

  total_steps: int
  warmup_steps: int
  steps_per_epoch: int
  peak_lr: float

  @classmethod
  def from_config(cls, config, data_steps_per_epoch: int | None) -> 'Schedule':
    spe = config_utils.steps_per_epoch(config, data_steps_per_epoch)
    return cls(total_steps=config_utils.total_steps(config, spe),
               warmup_steps=config_utils.warmup_steps(config, spe), steps_per_epoch=spe,
               peak_lr=config_utils.peak_lr(config))

  def lr(self, config) -> Callable:
    t = config.train
    return lambda step: self.peak_lr * lr_factor(
        step, kind=t.lr_schedule, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
        warmup_start=t.warmup_start, lr_end=t.lr_end)

  def weight_decay(self, config) -> Callable:
    t = config.train
    return lambda step: weight_decay_value(step, weight_decay=t.weight_decay,
                                           weight_decay_end=t.weight_decay_end,
                                           total_steps=self.total_steps)


def make_optimizer(config, schedule: Schedule) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW (betas 0.9/0.95) with masked, scheduled decoupled decay."""
  t = config.train
  adamw = optax.adamw(learning_rate=schedule.lr(config), b1=t.b1, b2=t.b2, eps=t.eps,
                      weight_decay=schedule.weight_decay(config), mask=weight_decay_mask)
  if t.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
  return adamw


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

def train_step(state, batch, rng, tok_params, *, model: tfm.MVARTransformer,
               tokenizer: vq.Tokenizer, tx: optax.GradientTransformation, first: int, last: int,
               label_smoothing: float = 0.0, ema_decay: float = 0.0):
  """One optimiser step on scales first..last; returns (state, metrics).

  state: {'params', 'opt_state', 'step', ['ema_params']}; batch: {'ids' (B, L) int32 or
  'image' (B, H, W, 3), 'label' (B,) int32}; rng: this step's dropout key.
  """
  layout = model.config.layout
  total_len = layout.total_len
  ids_BL, teacher_BlCv = teacher_forcing(batch, tokenizer, tok_params, layout)
  targets_Bl, x_BlCv = _segment_inputs(ids_BL, teacher_BlCv, layout, first, last)
  label_B = batch['label'].astype(jnp.int32)

  def loss_fn(params):
    logits_BlV = model.apply({'params': params}, label_B, x_BlCv, first=first, last=last,
                             train=True, rngs={'dropout': rng})
    loss_Bl, nll_Bl = cross_entropy(logits_BlV, targets_Bl, label_smoothing)
    # Weight 1/L for every token of the pyramid (upstream's loss_weight), summed over the segment.
    loss = jnp.mean(jnp.sum(loss_Bl, axis=1) / total_len)
    correct_Bl = (jnp.argmax(logits_BlV, axis=-1) == targets_Bl).astype(jnp.float32)
    return loss, (nll_Bl, correct_Bl)

  (loss, (nll_Bl, correct_Bl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new_state = dict(state, params=params, opt_state=opt_state, step=state['step'] + 1)
  if 'ema_params' in state:
    new_state['ema_params'] = jax.tree_util.tree_map(
        lambda e, p: ema_decay * e + (1 - ema_decay) * p, state['ema_params'], params)
  nll_K, corr_K, cnt_K = scale_metrics(nll_Bl, correct_Bl, jnp.ones_like(label_B, jnp.float32),
                                       layout, first, last)
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
  tx = make_optimizer(config, schedule)
  mesh = mesh or sharding.create_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  repl = sharding.replicated(mesh)

  boxed = jax.eval_shape(lambda: tfm.init_params(model_cfg, jax.random.key(0)))['params']
  param_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Adam moments live where their parameter lives; counts and other scalars are replicated.
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: repl)
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


def compile_train_step(setup: Setup, tokenizer: vq.Tokenizer, tok_shardings, *, first: int,
                       last: int, label_smoothing: float, ema_decay: float):
  """jit(train_step) for one segment: sharded in and out, the state donated."""
  fn = functools.partial(train_step, model=setup.model, tokenizer=tokenizer, tx=setup.tx,
                         first=first, last=last, label_smoothing=label_smoothing,
                         ema_decay=ema_decay)
  return jax.jit(fn, in_shardings=(setup.state_shardings, setup.batch_sharding, setup.replicated,
                                   tok_shardings),
                 out_shardings=(setup.state_shardings, setup.replicated), donate_argnums=(0,))


def compile_eval_step(setup: Setup, tokenizer: vq.Tokenizer, tok_shardings):
  fn = functools.partial(eval_step, model=setup.model, tokenizer=tokenizer)
  return jax.jit(fn, in_shardings=(setup.state_shardings['params'], setup.batch_sharding,
                                   tok_shardings),
                 out_shardings=setup.replicated)


# ============================================================================= tokenizer, weights

def load_tokenizer(config) -> tuple[vq.Tokenizer, dict]:
  """(Tokenizer, host params) from config.tokenizer.checkpoint, checked against config.model."""
  return load_tokenizer_for(config_utils.transformer_config_from(config),
                            config.tokenizer.checkpoint)


def load_tokenizer_for(model_cfg: tfm.TransformerConfig, path: str) -> tuple[vq.Tokenizer, dict]:
  """Tokenizer + host params of a converted dir (vqvae.msgpack/json) that fits `model_cfg`."""
  cfg_dict, params = checkpointing.load_converted(path, 'vqvae')
  cfg = vq.VQVAEConfig(**{k: v for k, v in cfg_dict.items() if k != '_type'})
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


# ============================================================================= data

class StepIndexedSource:
  """Batches as a pure function of (seed, step) over this process's in-memory examples.

  Each process holds an equal block of the split (as the pipeline does). Epoch e
  visits the block in the order permutation(seed, process, e); an epoch has
  ceil(n / b) batches and its last batch is filled from the start of the same
  permutation (upstream's fill_last). Step g reads batch g % steps_per_epoch of
  epoch g // steps_per_epoch, and its flips come from a generator seeded with
  (seed, process, epoch, batch), so a resumed run sees exactly the batches an
  uninterrupted run would have.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], local_batch: int, *, seed: int,
               num_examples: int,
               transform: Callable[[dict, np.random.Generator], dict] | None = None,
               process_index: int = 0):
    self.arrays = dict(arrays)
    sizes = {len(v) for v in self.arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f'arrays must share their first dimension, got {sizes}')
    self.local_examples = sizes.pop()
    if self.local_examples == 0:
      raise ValueError('the training split is empty (for this process)')
    self.local_batch, self.seed, self.process_index = int(local_batch), int(seed), process_index
    self.num_examples = int(num_examples)  # whole split, all processes
    self.transform = transform
    self.steps_per_epoch = max(1, math.ceil(self.local_examples / self.local_batch))
    self._epoch, self._order = None, None

  def indices(self, step: int) -> np.ndarray:
    """(local_batch,) indices into this process's block for step `step`."""
    epoch, i = divmod(int(step), self.steps_per_epoch)
    if epoch != self._epoch:
      perm = np.random.default_rng([self.seed, self.process_index, epoch]).permutation(
          self.local_examples)
      reps = math.ceil(self.steps_per_epoch * self.local_batch / self.local_examples)
      self._order = np.tile(perm, reps)[:self.steps_per_epoch * self.local_batch]
      self._epoch = epoch
    return self._order[i * self.local_batch:(i + 1) * self.local_batch]

  def batch(self, step: int) -> dict:
    idx = self.indices(step)
    out = {k: v[idx] for k, v in self.arrays.items()}
    if self.transform is None:
      return out
    epoch, i = divmod(int(step), self.steps_per_epoch)
    return self.transform(out, np.random.default_rng([self.seed, self.process_index, epoch, i, 1]))


class IteratorSource:
  """A streaming (tf.data) pipeline: batches in the iterator's order, not indexable by step.

  Resuming rebuilds the pipeline for the epoch of the resumed step, with the shuffle
  seed data.seed + epoch, and starts at the beginning of that epoch's fresh shuffle:
  the resumed run sees the same data distribution, not the same batch sequence.
  """

  def __init__(self, make_iterator: Callable[[int], Iterator[dict]], *, local_batch: int):
    self.make_iterator = make_iterator
    self._it = make_iterator(0)
    self.num_examples = int(self._it.num_examples)
    self.local_batch = local_batch
    global_batch = local_batch * jax.process_count()
    self.steps_per_epoch = max(1, math.ceil(self.num_examples / global_batch))
    self._next_step = 0

  def batch(self, step: int) -> dict:
    if step != self._next_step:
      epoch = step // self.steps_per_epoch
      logging.info('data: restarting the pipeline at epoch %d (step %d) with a fresh shuffle',
                   epoch, step)
      self._it = self.make_iterator(epoch)
    self._next_step = step + 1
    return next(self._it)


def _pipeline():
  from mvar_jax.data import pipeline  # imported late: it may pull in TensorFlow
  return pipeline


def token_expectation(config) -> dict:
  """What a token cache must match: the model's pyramid and vocabulary."""
  layout = ScaleLayout(tuple(config.model.patch_nums))
  return {'L': layout.total_len, 'vocab_size': int(config.model.vocab_size),
          'patch_nums': tuple(layout.patch_nums)}


def _unit_range(images_uint8):
  return images_uint8.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def make_train_source(config):
  """StepIndexedSource for in-memory data ('builtin', 'tokens'), else an IteratorSource."""
  from mvar_jax.data import builtin, token_cache
  pipeline = _pipeline()
  d = config.data
  pipeline.validate_data_config(d)
  pc, pi = jax.process_count(), jax.process_index()
  local_batch = int(config.train.batch_size) // pc
  if d.name == 'builtin':
    n = int(d.builtin_train_size)
    per = n // pc  # equal blocks, as the pipeline: processes step together
    images, labels = builtin.generate(per, image_size=d.image_size, num_classes=d.num_classes,
                                      seed=pipeline.BUILTIN_SEEDS['train'], start=pi * per)

    def transform(b, rng):
      x = b['image']
      if d.hflip:
        mirror = rng.random(len(x)) < 0.5
        x = np.where(mirror[:, None, None, None], x[:, :, ::-1], x)
      return {'image': _unit_range(x), 'label': b['label']}
    return StepIndexedSource({'image': images, 'label': labels}, local_batch, seed=d.seed,
                             num_examples=n, transform=transform, process_index=pi)
  if d.name == 'tokens':
    # The pipeline's own rule for where a split lives under data_dir.
    path = pipeline._split_dir(d.data_dir, 'train')  # pylint: disable=protected-access
    arrays, meta = token_cache.read_token_cache(
        path, expect=dict(token_expectation(config), image_size=d.image_size))
    if d.hflip and not meta['flip']:
      raise ValueError(f'data.hflip=True but the token cache {path} was built with flip=False')
    if len(arrays['labels']) and arrays['labels'].max() >= d.num_classes:
      raise ValueError(f'token cache {path} has label {arrays["labels"].max()} but '
                       f'data.num_classes={d.num_classes}')
    n = int(meta['count'])
    per = n // pc
    block = slice(pi * per, (pi + 1) * per)
    local = {'ids': arrays['ids'][block], 'label': arrays['labels'][block].astype(np.int32)}
    if d.hflip:
      local['ids_flip'] = arrays['ids_flip'][block]

    def transform(b, rng):
      ids = b['ids']
      if d.hflip:
        mirror = rng.random(len(ids)) < 0.5
        ids = np.where(mirror[:, None], b['ids_flip'], ids)
      return {'ids': ids.astype(np.int32), 'label': b['label']}
    return StepIndexedSource(local, local_batch, seed=d.seed, num_examples=n,
                             transform=transform, process_index=pi)

  def make_iterator(epoch: int):
    dd = d.copy_and_resolve_references()
    dd.seed = int(d.seed) + epoch
    return pipeline.create_dataset(dd, split='train', batch_size=int(config.train.batch_size))
  return IteratorSource(make_iterator, local_batch=local_batch)


def eval_batches(config) -> Iterator[dict]:
  """Local validation batches padded to the local batch, with 'mask' (B,) marking real rows."""
  pipeline = _pipeline()
  batch_size = int(config.train.batch_size)
  local = batch_size // jax.process_count()
  expect = token_expectation(config) if config.data.name == 'tokens' else None
  try:
    it = pipeline.create_dataset(config.data, split='val', batch_size=batch_size, shuffle=False,
                                 repeat=False, drop_remainder=False, token_expect=expect)
  except FileNotFoundError as e:
    logging.warning('no validation split (%s): skipping evaluation', e)
    return
  for b, out in enumerate(it):
    if 0 <= config.train.eval_batches <= b:
      return
    rows = len(out['label'])
    if rows < local:  # pad the last batch (every process must contribute equal shapes)
      out = {k: np.concatenate([v, np.repeat(v[-1:], local - rows, 0)]) for k, v in out.items()}
    out['mask'] = (np.arange(local) < rows).astype(np.float32)
    yield out


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


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf; the message names the step."""


# ============================================================================= the loop

def train_and_evaluate(config, workdir: str, *, step_hook: Callable[[int], None] | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Trains (resuming from `workdir/checkpoints` when it holds one); returns the last metrics.

  step_hook(step) runs on the host after every step (tests use it to simulate a kill).
  """
  from clu import metric_writers, periodic_actions  # imported here: pulls in TensorFlow
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config_utils.validate_config(config, check_mesh=mesh is None)
  layout = ScaleLayout(tuple(config.model.patch_nums))
  t = config.train

  # --------------------------------------------------------------- data and schedule
  source = make_train_source(config)
  schedule = Schedule.from_config(config, source.steps_per_epoch)
  logging.info('schedule: %s', schedule)

  # --------------------------------------------------------------- mesh, model, state
  setup = build(config, schedule, mesh)
  tokenizer, tok_host = load_tokenizer(config)
  images = config.data.name != 'tokens'  # images are tokenised inside the step
  if images and tokenizer.config.resolution != config.data.image_size:
    raise ValueError(f'data.image_size={config.data.image_size} but the tokenizer expects '
                     f'{tokenizer.config.resolution} px images')
  # The quantiser alone turns ids into teacher inputs; the encoder is needed for images.
  tok_params = jax.device_put(tok_host if images else {'quantize': tok_host['quantize']},
                              setup.replicated)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    max_to_keep=t.keep_checkpoints,
                                    async_save=t.async_checkpointing)
  root = jax.random.key(config.seed)
  init_rng, dropout_root, sample_root = jax.random.split(root, 3)
  window = Accumulator(layout.num_scales)
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(setup.abstract_state)
    window = Accumulator(layout.num_scales, meta.get('window'))
    logging.info('resumed from step %d', int(meta['step']))
  else:
    init_params = None
    if config.init_from:
      init_params = load_init_params(config, setup.abstract_state['params'])
    state = init_state(setup, init_rng, init_params)
  step = int(jax.device_get(state['step']))
  logging.info('transformer: %.2fM params; mesh %s', tfm.count_params(state['params']) / 1e6,
               dict(setup.mesh.shape))

  # --------------------------------------------------------------- steps
  tok_shardings = jax.tree_util.tree_map(lambda _: setup.replicated, tok_params)
  train_fns = {seg: compile_train_step(setup, tokenizer, tok_shardings, first=seg[0],
                                       last=seg[1], label_smoothing=t.label_smoothing,
                                       ema_decay=t.ema_decay)
               for seg in segments(t.schedule, layout.num_scales, config.model.refine_step)}
  eval_fn = compile_eval_step(setup, tokenizer, tok_shardings)
  lr_fn = schedule.lr(config)

  # --------------------------------------------------------------- writers and hooks
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  hooks = [periodic_actions.ReportProgress(num_train_steps=schedule.total_steps, writer=writer)]
  if t.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=t.profile_steps, logdir=workdir))
  last_metrics: dict[str, float] = {}
  pending: list[tuple[int, dict]] = []
  good_step = ckpt.latest_step()

  def flush():
    """Fetches pending per-step metrics, stops on a non-finite loss, accumulates the rest."""
    nonlocal pending
    fetched = jax.device_get(pending)
    pending = []
    for s, m in fetched:
      loss = float(m['loss'])
      if not np.isfinite(loss):
        raise NonFiniteLossError(
            f'training loss is {loss} (NaN/Inf) at step {s} (the update from step {s - 1} to '
            f'{s}); stopping without saving this state. Last good checkpoint: '
            f'{"none" if good_step is None else f"step {good_step}"} in {ckpt.directory}')
      window.add(m)

  def save(s: int):
    nonlocal good_step
    flush()  # never save a state whose losses were not checked
    ckpt.save(s, state, meta={'window': window.state(), 'config': config.to_json()})
    good_step = s

  def evaluate(s: int):
    flush()  # a NaN state is reported as such, not evaluated
    acc = Accumulator(layout.num_scales)
    params = state['ema_params'] if 'ema_params' in state else state['params']
    for local in eval_batches(config):
      batch = sharding.to_global_batch(local, setup.batch_sharding)
      acc.add(jax.device_get(eval_fn(params, batch, tok_params)))
    if acc.count.sum():
      out = acc.summary('val', layout)
      writer.write_scalars(s, out)
      last_metrics.update(out)

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
      grid = image_grid(np.asarray(jax.device_get(out.images_BHW3)))
      writer.write_images(s, {'samples': grid[None]})
    except Exception as e:  # noqa: BLE001 -- a failed preview must not stop training
      logging.exception('sampling at step %d failed: %s', s, e)

  # --------------------------------------------------------------- the loop
  logging.info('training from step %d to %d', step, schedule.total_steps)
  try:
    with checkpointing.PreemptionWatcher() as watcher:
      while step < schedule.total_steps:
        seg = segment_at(step, schedule=t.schedule, num_scales=layout.num_scales,
                         refine_step=config.model.refine_step, ratio_k=t.ratio_k)
        batch = sharding.to_global_batch(source.batch(step), setup.batch_sharding)
        rng = jax.random.fold_in(dropout_root, step)
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          state, metrics = train_fns[seg](state, batch, rng, tok_params)
        step += 1
        pending.append((step, metrics))
        for hook in hooks:
          hook(step)
        if step_hook is not None:
          step_hook(step)
        stop = watcher.should_stop(step)
        final = step == schedule.total_steps
        if step % t.log_every == 0 or final or stop:
          flush()
          if step % t.log_every == 0 or final:
            out = window.summary('train', layout)
            out['train/lr'] = float(lr_fn(step - 1))
            writer.write_scalars(step, out)
            last_metrics.update(out)
            window.reset()
        if step % t.checkpoint_every == 0 or final or stop:
          save(step)
        if stop:
          logging.warning('stopping at step %d after a preemption signal (checkpoint saved)', step)
          break
        if (t.eval_every and step % t.eval_every == 0) or final:
          evaluate(step)
        if t.sample_every and step % t.sample_every == 0:
          write_samples(step)
  finally:
    # Also on errors: the background write of the last good checkpoint must land first.
    ckpt.close()
    writer.flush()
    writer.close()
  return last_metrics


# ============================================================================= sample mode

def _abstract_params(model_cfg: tfm.TransformerConfig):
  return nn.unbox(jax.eval_shape(lambda: tfm.init_params(model_cfg, jax.random.key(0)))['params'])


def load_sampling_params(config, workdir: str):
  """(transformer module, {'params': ...}) from config.sample.checkpoint or the workdir.

  A converted directory (transformer.msgpack/json) brings its own architecture; a
  workdir checkpoint uses config.model and its EMA params when it has them and
  config.sample.use_ema is set.
  """
  if config.sample.checkpoint:
    cfg_dict, params = checkpointing.load_converted(config.sample.checkpoint, 'transformer')
    model_cfg = config_utils.transformer_config_from_dict(cfg_dict)
    abstract = _abstract_params(model_cfg)
    checkpointing.check_tree_matches(params, abstract, config.sample.checkpoint)
    return tfm.MVARTransformer(model_cfg), {'params': jax.device_put(params)}
  model_cfg = config_utils.transformer_config_from(config).validate()
  ckpt = checkpointing.Checkpointer(os.path.join(os.path.abspath(workdir), 'checkpoints'))
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt.directory} and sample.checkpoint is empty')
  use_ema = config.sample.use_ema and 'ema_params' in ckpt.item_structure(step)
  key = 'ema_params' if use_ema else 'params'
  abstract = _abstract_params(model_cfg)
  repl = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('d',)),
                                    jax.sharding.PartitionSpec())
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract)
  params = ckpt.restore_subtree(step, {key: abstract})[key]
  ckpt.close()
  logging.info('sampling from %s of step %d in %s', key, step, ckpt.directory)
  return tfm.MVARTransformer(model_cfg), {'params': params}


def sample_to_files(config, workdir: str) -> str:
  """Samples config.sample.num_images images (labels i % num_classes) to samples.npz + PNG.

  Returns the npz path. The npz is the ADM evaluator's format: arr_0 uint8
  (N, H, W, 3) and arr_1 int64 labels. Runs on this process's devices.
  """
  import tqdm
  from PIL import Image
  from mvar_jax import sampling
  config_utils.validate_config(config, check_mesh=False, mode='sample')
  s = config.sample
  model, params = load_sampling_params(config, workdir)
  tokenizer, tok_host = load_tokenizer_for(model.config, config.tokenizer.checkpoint)
  tok_params = jax.device_put(tok_host)
  n, bs = int(s.num_images), int(s.batch_size)
  num_classes = model.config.num_classes
  labels = np.arange(n) % num_classes
  key = jax.random.key(config.seed)
  out_images, out_labels = [], []
  for b, lo in enumerate(tqdm.tqdm(range(0, n, bs), desc='sampling', unit='batch')):
    lab = labels[lo:lo + bs]
    padded = np.concatenate([lab, np.repeat(lab[-1:], bs - len(lab))])  # one compiled shape
    out = sampling.sample(model, params, tokenizer, tok_params, key=jax.random.fold_in(key, b),
                          labels=padded, cfg=s.cfg, top_k=s.top_k, top_p=s.top_p,
                          more_smooth=s.more_smooth)
    imgs = np.asarray(jax.device_get(out.images_BHW3))[:len(lab)]
    out_images.append(np.clip(np.round(imgs * 255), 0, 255).astype(np.uint8))
    out_labels.append(lab)
  arr_0, arr_1 = np.concatenate(out_images), np.concatenate(out_labels).astype(np.int64)
  out_dir = s.output_dir or os.path.join(workdir, 'samples')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'samples.npz')
  if jax.process_index() == 0:
    np.savez(path, arr_0=arr_0, arr_1=arr_1)
    Image.fromarray(image_grid(arr_0[:64].astype(np.float32) / 255)).save(
        os.path.join(out_dir, 'samples.png'))
  logging.info('wrote %d samples to %s', len(arr_0), path)
  return path


def image_grid(images_NHW3: np.ndarray, cols: int | None = None) -> np.ndarray:
  """(N, H, W, 3) floats in [0, 1] -> one (rows*H, cols*W, 3) uint8 grid."""
  n, h, w, c = images_NHW3.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  imgs = np.clip(np.round(images_NHW3 * 255), 0, 255).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = imgs[i]
  return grid


def _flatten(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
