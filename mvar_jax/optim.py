"""The MVAR optimiser: upstream's lr/wd schedules and an AdamW with per-parameter step counts.

    schedule = Schedule.from_config(config, data_steps_per_epoch)
    tx = make_optimizer(config, schedule)                  # one state for every segment
    updates, opt_state = tx.update(grads, opt_state, params, active=active_tree)

Why our own AdamW (and not optax.adamw): upstream trains one segment of scales per
iteration, and a parameter the segment does not use (`pos_start` outside the segment
that starts at scale 0) has no gradient there. torch's AdamW skips such a parameter
entirely: no update, no decay of its moments, no weight decay and no increment of its
own `step` (bias corrections use that per-parameter count). optax keeps one count for
the whole tree and would keep moving the parameter on momentum. `active` (a static tree
of bools, see `used_params`) says which leaves a segment trains; the others keep their
value, moments and count bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mvar_jax import config_utils

# Substrings of parameter paths that get no weight decay (upstream's nowd_keys; the ones
# that name no parameter here are kept so the rule reads as upstream's).
NO_WEIGHT_DECAY_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed',
                        'pos_1LC', 'pos_start', 'start_pos', 'lvl_embed', 'gamma', 'beta',
                        'ada_gss', 'moe_bias', 'scale_mul')


# ============================================================================= schedules

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


# ============================================================================= decay mask

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


def used_params(fn: Callable, params, *args) -> Any:
  """Tree of bools: True where `fn(params, *args)` reads the leaf (a static, traced check).

  A leaf no equation of fn's jaxpr consumes has no gradient, as a torch parameter with
  `grad is None`. Conservative: a leaf handed to a nested call counts as used.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(lambda ps, *a: fn(jax.tree_util.tree_unflatten(treedef, ps), *a))(
      leaves, *args)
  jaxpr = closed.jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  invars = jaxpr.invars[:len(leaves)]
  return jax.tree_util.tree_unflatten(treedef, [id(v) in read for v in invars])


# ============================================================================= AdamW

class AdamWState(NamedTuple):
  """step: optimiser steps taken (drives the lr/wd schedules); count: per leaf, the steps
  that leaf took (torch's per-parameter `state['step']`); mu, nu: Adam moments."""

  step: jax.Array
  count: Any
  mu: Any
  nu: Any


def adamw(learning_rate: Callable, weight_decay: Callable, *, b1: float, b2: float, eps: float,
          grad_clip: float, decay_mask: Callable | Any) -> optax.GradientTransformationExtraArgs:
  """Global-norm clip, then torch-semantics AdamW with decoupled, masked, scheduled decay.

  update(grads, state, params, active=None): `active` is a static tree of bools (None:
  all); inactive leaves get a zero update and keep their moments and count.
  """

  def init(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return AdamWState(step=jnp.zeros((), jnp.int32),
                      count=jax.tree_util.tree_map(lambda _: jnp.zeros((), jnp.int32), params),
                      mu=jax.tree_util.tree_map(zeros, params),
                      nu=jax.tree_util.tree_map(zeros, params))

  def update(grads, state, params=None, *, active=None, **extra):
    del extra
    if params is None:
      raise ValueError('adamw needs params (decoupled weight decay)')
    if active is None:
      active = jax.tree_util.tree_map(lambda _: True, params)
    decay = decay_mask(params) if callable(decay_mask) else decay_mask
    if grad_clip > 0:  # optax.clip_by_global_norm's rule (inactive leaves have zero grads)
      g_norm = optax.global_norm(grads)
      grads = jax.tree_util.tree_map(
          lambda g: jnp.where(g_norm < grad_clip, g, g / g_norm * grad_clip), grads)
    lr = learning_rate(state.step)
    wd = weight_decay(state.step)

    def one(g, p, m, v, c, on, dec):
      if not on:  # untouched: as torch's AdamW for a parameter without a gradient
        return jnp.zeros_like(p), m, v, c
      g = g.astype(jnp.float32)
      c = c + 1
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * jnp.square(g)
      cf = c.astype(jnp.float32)
      m_hat = m / (1 - b1 ** cf)
      v_hat = v / (1 - b2 ** cf)
      u = m_hat / (jnp.sqrt(v_hat) + eps)
      if dec:
        u = u + wd * p
      return (-lr * u).astype(p.dtype), m, v, c

    out = jax.tree_util.tree_map(one, grads, params, state.mu, state.nu, state.count, active,
                                 decay)
    pick = lambda i: jax.tree_util.tree_map(lambda _, o: o[i], params, out,
                                            is_leaf=lambda x: isinstance(x, tuple))
    updates, mu, nu, count = pick(0), pick(1), pick(2), pick(3)
    return updates, AdamWState(step=state.step + 1, count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


def apply_updates(params, updates, active=None):
  """params + updates, with inactive leaves returned as they were (bit for bit, -0.0 too)."""
  new = optax.apply_updates(params, updates)
  if active is None:
    return new
  return jax.tree_util.tree_map(lambda on, p, n: n if on else p, active, params, new)


def state_shardings(opt_state_abstract: AdamWState, param_shardings, replicated) -> AdamWState:
  """Moments live where their parameter lives; counts are replicated scalars."""
  return AdamWState(step=replicated,
                    count=jax.tree_util.tree_map(lambda _: replicated, opt_state_abstract.count),
                    mu=param_shardings, nu=param_shardings)


def make_optimizer(config, schedule: Schedule) -> optax.GradientTransformationExtraArgs:
  """AdamW (betas 0.9/0.95) after a global-norm clip, with masked, scheduled decoupled decay."""
  t = config.train
  return adamw(schedule.lr(config), schedule.weight_decay(config), b1=t.b1, b2=t.b2, eps=t.eps,
               grad_clip=float(t.grad_clip), decay_mask=weight_decay_mask)
