"""The Python API: load weights, encode/decode images, teacher-forced logits, sample.

    import jax, mvar_jax.api as mvar
    pipe = mvar.load_pretrained('weights/')            # written by `python -m mvar_jax.convert`
    ids = pipe.encode(images_BHW3)                     # uint8, or float in [0, 1]
    recon_BHW3 = pipe.decode(ids)                      # float32 in [0, 1]
    logits_BLV = pipe.logits(ids, labels_B)            # teacher-forced, all scales
    out = pipe.sample(jax.random.key(0), labels=[207, 360], cfg=2.7, top_k=1200, top_p=0.99)

Every function is jitted once per input shape. Parameters are plain pytrees; a
pipeline can also be built from in-memory params (`MVARPipeline(...)`), e.g. from
a training workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax import compilation_cache, config_utils, sampling, vqvae
from mvar_jax.attention import AttentionConfig
from mvar_jax.transformer import MVARTransformer, TransformerConfig


def _as_variables(params):
  return params if 'params' in params else {'params': params}


@dataclasses.dataclass(frozen=True, eq=False)
class MVARPipeline:
  """A tokenizer and a transformer with their parameters."""

  tokenizer_config: vqvae.VQVAEConfig
  tokenizer_params: Any
  transformer_config: TransformerConfig
  transformer_params: Any

  def __post_init__(self):
    compilation_cache.enable()  # a second process loads the sampler instead of compiling it
    t, v = self.transformer_config, self.tokenizer_config
    if (t.vocab_size, t.cvae, tuple(t.patch_nums)) != (v.vocab_size, v.z_channels, tuple(v.patch_nums)):
      raise ValueError(
          'tokenizer and transformer disagree: transformer (vocab_size, cvae, patch_nums) = '
          f'{(t.vocab_size, t.cvae, tuple(t.patch_nums))}, tokenizer (vocab_size, z_channels, '
          f'patch_nums) = {(v.vocab_size, v.z_channels, tuple(v.patch_nums))}')

  @property
  def tokenizer(self) -> vqvae.Tokenizer:
    return vqvae.Tokenizer(self.tokenizer_config)

  @property
  def transformer(self) -> MVARTransformer:
    return MVARTransformer(self.transformer_config)

  @property
  def image_size(self) -> int:
    return self.tokenizer_config.resolution

  def encode(self, images_BHW3) -> list[jax.Array]:
    """Token ids per scale, (B, pn*pn) int32, of uint8 images or floats in [0, 1]."""
    img = _to_unit_interval(images_BHW3, self.image_size) * 2.0 - 1.0
    return _jit_encode(self.tokenizer)(self.tokenizer_params, img)

  def decode(self, ids) -> jax.Array:
    """Images (B, H, W, 3) float32 in [0, 1] from ids per scale."""
    return _jit_decode(self.tokenizer)(self.tokenizer_params, list(ids))

  def teacher_input(self, ids) -> jax.Array:
    """(B, L - 1, Cvae) teacher-forcing input of ids per scale."""
    return _jit_teacher(self.tokenizer)(self.tokenizer_params, list(ids))

  def logits(self, ids, labels_B, *, first: int = 0, last: int | None = None) -> jax.Array:
    """Teacher-forced logits (B, L_seg, V) of scales first..last for ids and labels."""
    last = self.transformer_config.layout.num_scales - 1 if last is None else last
    fn = _jit_logits(self.tokenizer, self.transformer, first, last)
    return fn(self.tokenizer_params, _as_variables(self.transformer_params), list(ids),
              jnp.asarray(labels_B, jnp.int32))

  def sample(self, key, *, labels=None, batch_size=None, cfg: float = 1.5, top_k: int = 0,
             top_p: float = 1.0, more_smooth: bool = False) -> sampling.SampleOutput:
    """Class-conditional samples; see `mvar_jax.sampling.sample`."""
    return sampling.sample(self.transformer, self.transformer_params, self.tokenizer,
                           self.tokenizer_params, key=key, labels=labels,
                           batch_size=batch_size, cfg=cfg, top_k=top_k, top_p=top_p,
                           more_smooth=more_smooth)


def _to_unit_interval(images, image_size: int):
  arr = jnp.asarray(images)
  if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1:3] != (image_size, image_size):
    raise ValueError(f'images must be (B, {image_size}, {image_size}, 3), got {arr.shape}')
  if arr.dtype == jnp.uint8:
    return arr.astype(jnp.float32) / 255.0
  return arr.astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _jit_encode(tok):
  return jax.jit(tok.img_to_ids)


@functools.lru_cache(maxsize=None)
def _jit_decode(tok):
  return jax.jit(lambda p, ids: (tok.ids_to_img(p, ids) + 1.0) * 0.5)


@functools.lru_cache(maxsize=None)
def _jit_teacher(tok):
  return jax.jit(tok.ids_to_teacher_input)


@functools.lru_cache(maxsize=None)
def _jit_logits(tok, model, first: int, last: int):
  layout = model.config.layout
  first_l = layout.patch_nums[0] ** 2

  def fn(v_params, t_vars, ids, labels):
    teacher = tok.ids_to_teacher_input(v_params, ids)  # (B, L - first_l, Cvae)
    begin, end = layout.span(first, last)
    x = teacher[:, max(begin - first_l, 0):end - first_l]
    return model.apply(t_vars, labels, x, first=first, last=last)

  return jax.jit(fn)


# ----------------------------------------------------------------------------- loading

def load_pretrained(directory: str, *, attention: AttentionConfig | None = None,
                    dtype: str | None = None) -> MVARPipeline:
  """Reads `vqvae.{msgpack,json}` and `transformer.{msgpack,json}` from `directory`.

  `attention` overrides the stored attention settings (e.g. AttentionConfig(mode='var')
  to run a VAR checkpoint as VAR, or another neighbourhood implementation).
  """
  v_cfg, v_params = load_converted(directory, 'vqvae')
  t_cfg, t_params = load_converted(directory, 'transformer')
  overrides = {}
  if attention is not None:
    overrides['attention'] = attention
  if dtype is not None:
    overrides['dtype'] = dtype
  if overrides:
    t_cfg = dataclasses.replace(t_cfg, **overrides).validate()
  return MVARPipeline(v_cfg, v_params, t_cfg, t_params)


def load_converted(directory: str, name: str):
  """(config, params) of one converted model (`name` is 'vqvae' or 'transformer')."""
  from mvar_jax import checkpointing
  cfg_dict, params = checkpointing.load_converted(directory, name)
  cfg = config_from_dict(cfg_dict)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  _check_tree(cfg, params, name, os.path.join(directory, f'{name}.msgpack'))
  return cfg, params


def config_from_dict(d: dict):
  """Inverse of `convert.config_to_dict`, dispatching on its '_type'."""
  kind = d.get('_type')
  if kind == 'TransformerConfig':
    return config_utils.transformer_config_from_dict(d)
  if kind == 'VQVAEConfig':
    return vqvae.VQVAEConfig(**{k: v for k, v in d.items() if k != '_type'}).validate()
  raise ValueError(f'unknown config type {kind!r} (expected TransformerConfig or VQVAEConfig)')


def _check_tree(cfg, params, name, path):
  """Validates loaded params against a freshly initialised abstract tree."""
  from mvar_jax import convert, transformer
  init = transformer.init_params if name == 'transformer' else vqvae.init_params
  abstract = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))['params']
  import flax.linen as nn
  want = {p: tuple(v.shape) for p, v in convert._flatten(nn.unbox(abstract)).items()}
  got = {p: tuple(np.shape(v)) for p, v in convert._flatten(params).items()}
  missing = ['/'.join(p) for p in want if p not in got]
  unexpected = ['/'.join(p) for p in got if p not in want]
  misshaped = [('/'.join(p), got[p], want[p]) for p in want if p in got and got[p] != want[p]]
  if missing or unexpected or misshaped:
    raise convert.CheckpointMismatchError(f'{name} ({path})', missing, unexpected, misshaped)
