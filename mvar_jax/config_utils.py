"""From an ml_collections run config (configs/*.py) to the frozen dataclasses, plus validation.

    validate_config(config)                    # before anything compiles; errors name the field
    model_cfg = transformer_config_from(config)
    steps = total_steps(config, num_train_examples)

Derived values live here (and not in the config files) so that a command-line
override such as `--config.model.depth=20` changes everything that depends on it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

from mvar_jax.attention import MODES as ATTENTION_MODES
from mvar_jax.attention import AttentionConfig
from mvar_jax.layout import ScaleLayout
from mvar_jax.transformer import DTYPES, TransformerConfig

SCHEDULES = ('segments', 'all')  # train.schedule
LR_SCHEDULES = ('lin0', 'lin', 'lin00', 'cos', 'constant')  # train.lr_schedule
MODES = ('train', 'sample')  # main.py --mode


# ----------------------------------------------------------------------------- model

SAMPLE_PARAM_DTYPES = ('', 'float32', 'bfloat16')  # '' = as stored


def drop_path_rate(model_cfg: Mapping[str, Any]) -> float:
  """model.drop_path_rate, or the official 0.1 * depth / 24 when it is < 0."""
  rate = float(model_cfg['drop_path_rate'])
  return 0.1 * int(model_cfg['depth']) / 24 if rate < 0 else rate


def transformer_config_from(config) -> TransformerConfig:
  """TransformerConfig of `config.model` (width/heads <= 0 take the official 64*d, d)."""
  m = config.model
  depth = int(m.depth)
  attention = AttentionConfig(
      mode=m.attention_mode, refine_step=int(m.refine_step), kernel_size=int(m.kernel_size),
      implementation=m.attention_implementation,
      fused_qkv=bool(m.get('attention_fused_qkv', True)))
  return TransformerConfig(
      depth=depth,
      width=int(m.width) if m.width > 0 else 64 * depth,
      num_heads=int(m.num_heads) if m.num_heads > 0 else depth,
      mlp_ratio=float(m.mlp_ratio),
      num_classes=int(m.num_classes),
      vocab_size=int(m.vocab_size),
      cvae=int(m.cvae),
      patch_nums=tuple(int(p) for p in m.patch_nums),
      attention=attention,
      drop_path_rate=drop_path_rate(m),
      cond_drop_rate=float(m.cond_drop_rate),
      dtype=m.dtype,
      ffn_implementation=m.get('ffn_implementation', 'auto'),
      remat=bool(m.remat),
      grad_boundaries=m.get('grad_boundaries', 'auto'),
      transposed_weight_grads=m.get('transposed_weight_grads', 'auto'),
      init_adaln=float(m.init_adaln),
      init_adaln_gamma=float(m.init_adaln_gamma),
      init_head=float(m.init_head),
  )


def transformer_config_from_dict(d: Mapping[str, Any]) -> TransformerConfig:
  """Inverse of convert.config_to_dict for a TransformerConfig (JSON lists -> tuples)."""
  d = {k: v for k, v in d.items() if k != '_type'}
  if isinstance(d.get('attention'), Mapping):
    d['attention'] = AttentionConfig(**d['attention'])
  if 'patch_nums' in d:
    d['patch_nums'] = tuple(int(p) for p in d['patch_nums'])
  return TransformerConfig(**d).validate()


# ----------------------------------------------------------------------------- schedule

def peak_lr(config) -> float:
  """lr = tblr * global_batch / 256 (the official linear scaling rule)."""
  return float(config.train.tblr) * int(config.train.batch_size) / 256


def steps_per_epoch(config, data_steps_per_epoch: int | None) -> int:
  """train.steps_per_epoch when > 0, else what the data source reports (ceil(N / batch))."""
  if config.train.steps_per_epoch > 0:
    return int(config.train.steps_per_epoch)
  if not data_steps_per_epoch:
    raise ValueError('train.steps_per_epoch must be > 0 when the dataset size is unknown')
  return int(data_steps_per_epoch)


def total_steps(config, steps_per_epoch: int) -> int:
  """train.num_steps when > 0, else epochs * steps per epoch (one optimiser step per iteration)."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return max(1, round(float(config.train.epochs) * steps_per_epoch))


def warmup_steps(config, steps_per_epoch: int) -> int:
  """train.warmup_epochs (< 0: epochs / 50, as upstream) in steps, rounded as upstream."""
  wp = float(config.train.warmup_epochs)
  if wp < 0:
    wp = float(config.train.epochs) / 50
  return int(round(wp * steps_per_epoch))


# ----------------------------------------------------------------------------- validation

def _one_of(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{name} must be one of {tuple(allowed)}, got {value!r}')


def check_finite_floats(section, prefix: str) -> None:
  """Every float field of a config section must be finite (a NaN passes every range check)."""
  for key, value in section.items():
    if isinstance(value, float):
      _finite_number(f'{prefix}.{key}', value)


def _finite_number(name: str, value) -> None:
  """A real, finite number. A config file may set a field to None (ml_collections allows it),
  which would fail the comparisons below with a TypeError that names no field."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f'{name} must be a finite number, got {value!r}')


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
  _finite_number(name, value)
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f'{name} must be {">= 0" if allow_zero else "> 0"}, got {value}')


def _in_range(name: str, value, lo, hi, *, hi_open: bool = True) -> None:
  _finite_number(name, value)
  ok = lo <= value < hi if hi_open else lo <= value <= hi
  if not ok:
    raise ValueError(f'{name} must be in [{lo}, {hi}{")" if hi_open else "]"}, got {value}')


def validate_config(config, *, check_mesh: bool = True, mode: str = 'train') -> None:
  """Raises ValueError naming the offending field and the allowed values.

  Checks everything that would otherwise fail deep inside tracing or after hours:
  schedule names, ranges, the model/tokenizer fit, the mesh against the device
  count, and the global batch against the batch shards.
  """
  _one_of('mode', mode, MODES)
  m, t = config.model, config.train
  # --- model
  _positive('model.depth', m.depth)
  _one_of('model.dtype', m.dtype, tuple(DTYPES))
  _one_of('model.attention_mode', m.attention_mode, ATTENTION_MODES)
  try:
    layout = ScaleLayout(tuple(m.patch_nums))
  except ValueError as e:
    raise ValueError(f'model.patch_nums: {e}') from None
  if m.attention_mode == 'mvar':
    _in_range('model.refine_step', m.refine_step, 0, layout.num_scales, hi_open=False)
  _in_range('model.cond_drop_rate', m.cond_drop_rate, 0.0, 1.0)
  if m.drop_path_rate >= 1.0:
    raise ValueError(f'model.drop_path_rate must be < 1 (or < 0 for 0.1*depth/24), '
                     f'got {m.drop_path_rate}')
  try:
    transformer_config_from(config).validate()
  except ValueError as e:
    raise ValueError(f'model: {e}') from None
  # --- train
  for section in ('model', 'train', 'sample'):
    check_finite_floats(config[section], section)
  _one_of('train.schedule', t.schedule, SCHEDULES)
  _one_of('train.lr_schedule', t.lr_schedule, LR_SCHEDULES)
  if t.schedule == 'segments':
    if m.attention_mode != 'mvar':
      raise ValueError("train.schedule='segments' needs model.attention_mode='mvar' (a segment "
                       "that starts after scale 0 cannot see the earlier scales in 'var' mode); "
                       "use train.schedule='all'")
    if not 1 <= m.refine_step <= layout.num_scales:
      raise ValueError(f'model.refine_step must be in [1, {layout.num_scales}] for '
                       f"train.schedule='segments', got {m.refine_step}")
    _positive('train.ratio_k', t.ratio_k)
  _positive('train.batch_size', t.batch_size)
  accum = t.get('grad_accum_steps', 1)
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ValueError(f'train.grad_accum_steps must be an integer >= 1, got {accum!r}')
  if t.batch_size % accum:
    raise ValueError(f'train.batch_size ({t.batch_size}) must be a multiple of '
                     f'train.grad_accum_steps ({accum}): the micro-batches are equal')
  if t.num_steps <= 0:
    _positive('train.epochs', t.epochs)
  _positive('train.tblr', t.tblr)
  _in_range('train.warmup_start', t.warmup_start, 0.0, 1.0, hi_open=False)
  _in_range('train.lr_end', t.lr_end, 0.0, 1.0, hi_open=False)
  _positive('train.weight_decay', t.weight_decay, allow_zero=True)
  _in_range('train.b1', t.b1, 0.0, 1.0)
  _in_range('train.b2', t.b2, 0.0, 1.0)
  _positive('train.eps', t.eps)
  _positive('train.grad_clip', t.grad_clip, allow_zero=True)
  _in_range('train.label_smoothing', t.label_smoothing, 0.0, 1.0)
  _in_range('train.ema_decay', t.ema_decay, 0.0, 1.0)
  for name in ('log_every', 'checkpoint_every'):
    _positive(f'train.{name}', t[name])
  _positive('train.keep_checkpoints', t.keep_checkpoints)
  for name in ('eval_every', 'sample_every'):
    _positive(f'train.{name}', t[name], allow_zero=True)
  # --- tokenizer / init
  if mode == 'train' and not config.tokenizer.checkpoint:
    raise ValueError('tokenizer.checkpoint must name a converted VQ-VAE directory '
                     '(vqvae.msgpack + vqvae.json, see mvar_jax/convert.py)')
  # --- sample
  s = config.sample
  _positive('sample.num_images', s.num_images)
  _positive('sample.batch_size', s.batch_size)
  if s.cfg < 0:
    raise ValueError(f'sample.cfg must be >= 0, got {s.cfg}')
  if not 0.0 < s.top_p <= 1.0:
    raise ValueError(f'sample.top_p must be in (0, 1] (1 disables it), got {s.top_p}')
  _positive('sample.top_k', s.top_k, allow_zero=True)
  if s.get('decoder_dtype', ''):
    from mvar_jax.vqvae import DECODER_DTYPES
    _one_of('sample.decoder_dtype', s.decoder_dtype, ('',) + DECODER_DTYPES)
  _one_of('sample.param_dtype', s.get('param_dtype', ''), SAMPLE_PARAM_DTYPES)
  # --- mesh and batch
  if check_mesh:
    from mvar_jax import sharding
    data, fsdp = sharding.mesh_shape(config.mesh, len(sharding.mesh_devices(config.mesh)))
    sharding.logical_rules(config.mesh)
    if mode == 'train' and t.batch_size % (data * fsdp * accum):
      raise ValueError(f'train.batch_size ({t.batch_size}) must be a multiple of the batch '
                       f'shards mesh.data * mesh.fsdp = {data * fsdp}'
                       + (f' times train.grad_accum_steps = {accum} (every micro-batch is '
                          'split over the shards)' if accum > 1 else ''))
  # --- data (the pipeline owns its fields)
  if 'data' in config and mode == 'train':
    if config.data.num_classes > m.num_classes:
      raise ValueError(f'data.num_classes ({config.data.num_classes}) must be <= model.num_classes '
                       f'({m.num_classes})')
    try:
      from mvar_jax.data import pipeline
    except ImportError:
      pipeline = None
    if pipeline is not None and hasattr(pipeline, 'validate_data_config'):
      pipeline.validate_data_config(config.data)
