"""The Python API: load weights, encode/decode images, teacher-forced logits, sample.

    import jax, mvar_jax.api as mvar
    pipe = mvar.load_pretrained('weights/')            # written by `python -m mvar_jax.convert`
    ids = pipe.encode(images_BHW3)                     # uint8, or float in [0, 1] (value_range=)
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

from mvar_jax import compilation_cache, config_utils, sampling, vqvae, xla_cpu
from mvar_jax.attention import AttentionConfig
from mvar_jax.transformer import DTYPES, MVARTransformer, TransformerConfig


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

  def encode(self, images_BHW3, *, value_range: tuple[float, float] = (0.0, 1.0)
             ) -> list[jax.Array]:
    """Token ids per scale, (B, pn*pn) int32, of (B, H, W, 3) images.

    uint8 images are read as [0, 255]; float images must lie in `value_range` (default
    [0, 1]; upstream's tensors are in [-1, 1]: pass value_range=(-1, 1)). Values outside
    the range raise instead of being tokenized wrongly.
    """
    img = _to_model_range(images_BHW3, self.image_size, value_range)
    return _jit_encode(self.tokenizer)(self.tokenizer_params, img)

  def decode(self, ids) -> jax.Array:
    """Images (B, H, W, 3) float32 in [0, 1] from ids per scale."""
    ids = _checked_ids(ids, self.tokenizer_config.patch_nums, self.tokenizer_config.vocab_size)
    return _jit_decode(self.tokenizer)(self.tokenizer_params, ids)

  def teacher_input(self, ids) -> jax.Array:
    """(B, L - 1, Cvae) teacher-forcing input of ids per scale."""
    ids = _checked_ids(ids, self.tokenizer_config.patch_nums, self.tokenizer_config.vocab_size)
    return _jit_teacher(self.tokenizer)(self.tokenizer_params, ids)

  def logits(self, ids, labels_B, *, first: int = 0, last: int | None = None,
             allow_null_class: bool = False) -> jax.Array:
    """Teacher-forced logits (B, L_seg, V) of scales first..last for ids and labels.

    labels_B: (B,) class ids in [0, num_classes); with allow_null_class=True also
      num_classes, the null class (the unconditional branch of classifier-free guidance).
    """
    num_scales = self.transformer_config.layout.num_scales
    last = num_scales - 1 if last is None else last
    for name, value in (('first', first), ('last', last)):
      if not isinstance(value, (int, np.integer)) or not 0 <= value < num_scales:
        raise ValueError(f'{name} must be a scale index in [0, {num_scales}), got {value!r}')
    if first > last:
      raise ValueError(f'first must be <= last, got first={first}, last={last}')
    ids = _checked_ids(ids, self.tokenizer_config.patch_nums, self.tokenizer_config.vocab_size)
    labels = _checked_labels(labels_B, self.transformer_config.num_classes,
                             batch=ids[0].shape[0], allow_null=allow_null_class)
    fn = _jit_logits(self.tokenizer, self.transformer, int(first), int(last))
    return fn(self.tokenizer_params, _as_variables(self.transformer_params), ids, labels)

  def sample(self, key, *, labels=None, batch_size=None, cfg: float = 1.5, top_k: int = 0,
             top_p: float = 1.0, more_smooth: bool = False) -> sampling.SampleOutput:
    """Class-conditional samples; see `mvar_jax.sampling.sample`.

    labels: (B,) class ids in [0, num_classes] (num_classes: unconditional), or None for
      `batch_size` random classes. top_k=0 and top_p=0 or 1 turn that filter off (upstream's
      convention for top_p=0).
    """
    num_classes = self.transformer_config.num_classes
    if labels is not None:
      labels = _checked_labels(labels, num_classes, batch=None, allow_null=True)
    elif (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
          or batch_size < 1):
      raise ValueError(f'give labels, or batch_size as an integer >= 1; got batch_size='
                       f'{batch_size!r}')
    if not isinstance(top_p, (int, float, np.number)) or not np.isfinite(top_p):
      raise ValueError(f'top_p must be a finite number in [0, 1] (0 or 1: off), got {top_p!r}')
    if top_p == 0:  # upstream: top_p=0 means no nucleus filtering
      top_p = 1.0
    return sampling.sample(self.transformer, self.transformer_params, self.tokenizer,
                           self.tokenizer_params, key=key, labels=labels,
                           batch_size=batch_size, cfg=cfg, top_k=top_k, top_p=top_p,
                           more_smooth=more_smooth)


# ----------------------------------------------------------------------------- input checks

def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _to_model_range(images, image_size: int, value_range):
  """(B, S, S, 3) uint8 or floats in `value_range` -> float32 in [-1, 1], checked."""
  arr = images if isinstance(images, jax.Array) else np.asarray(images)
  if arr.ndim != 4 or arr.shape[-1] != 3 or tuple(arr.shape[1:3]) != (image_size, image_size):
    raise ValueError(f'images must be (B, {image_size}, {image_size}, 3), got {arr.shape}')
  if arr.shape[0] == 0:
    raise ValueError('images is an empty batch (B=0); give at least one image')
  if arr.dtype == jnp.uint8:
    return jnp.asarray(arr).astype(jnp.float32) / 255.0 * 2.0 - 1.0
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise ValueError(f'images must be uint8 or floating point, got dtype {arr.dtype}')
  try:
    lo, hi = (float(v) for v in value_range)
  except (TypeError, ValueError):
    raise ValueError(f'value_range must be (low, high), got {value_range!r}') from None
  if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
    raise ValueError(f'value_range must be two finite numbers with low < high, got {value_range!r}')
  if not _is_traced(arr):
    host = np.asarray(arr, np.float32)
    if not np.isfinite(host).all():
      raise ValueError('images contain NaN or infinite values')
    tol = 1e-3 * (hi - lo)  # rounding of a resize or a colour conversion
    vmin, vmax = float(host.min()), float(host.max())
    if vmin < lo - tol or vmax > hi + tol:
      hint = (' (these look like upstream [-1, 1] images: pass value_range=(-1, 1))'
              if vmin < 0 <= lo else '')
      raise ValueError(f'images must lie in value_range=[{lo:g}, {hi:g}], got values in '
                       f'[{vmin:g}, {vmax:g}]{hint}')
  x = jnp.asarray(arr, jnp.float32)
  return (x - lo) * (2.0 / (hi - lo)) - 1.0


def _checked_ids(ids, patch_nums, vocab_size: int) -> list:
  """ids per scale as a list, checked: K arrays (B, pn*pn) of integers in [0, vocab_size)."""
  k = len(patch_nums)
  if isinstance(ids, (jax.Array, np.ndarray)) or not hasattr(ids, '__len__'):
    raise ValueError(f'ids must be a list of {k} arrays, one (B, pn*pn) per scale of '
                     f'patch_nums={tuple(patch_nums)}; got {type(ids).__name__}')
  ids = list(ids)
  if len(ids) != k:
    raise ValueError(f'ids must hold {k} arrays (one per scale of patch_nums={tuple(patch_nums)}), '
                     f'got {len(ids)}')
  batch = None
  for si, (a, pn) in enumerate(zip(ids, patch_nums)):
    if not isinstance(a, jax.Array):
      a = ids[si] = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != pn * pn or (batch is not None and a.shape[0] != batch):
      want = f'({"B" if batch is None else batch}, {pn * pn})'
      raise ValueError(f'ids[{si}] (scale {si}, {pn}x{pn}) must have shape {want}, got {a.shape}')
    batch = a.shape[0]
    if batch == 0:
      raise ValueError('ids is an empty batch (B=0)')
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise ValueError(f'ids[{si}] must hold integers, got dtype {a.dtype}')
    if not _is_traced(a):
      host = np.asarray(a)
      if host.min() < 0 or host.max() >= vocab_size:
        raise ValueError(f'ids[{si}] (scale {si}) must be in [0, vocab_size={vocab_size}), got '
                         f'values in [{host.min()}, {host.max()}]')
  return ids


def _checked_labels(labels, num_classes: int, *, batch: int | None, allow_null: bool):
  """(B,) int32 class ids in [0, num_classes) (or [0, num_classes] with allow_null), checked."""
  if _is_traced(labels):
    return labels
  arr = np.asarray(labels)
  if arr.ndim != 1:
    raise ValueError(f'labels must be a 1-D array of class ids, got shape {arr.shape}')
  if arr.size == 0:
    raise ValueError('labels is empty: give at least one class id')
  if not (np.issubdtype(arr.dtype, np.integer) or
          (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))):
    raise ValueError(f'labels must be integer class ids, got {arr.dtype} values')
  if batch is not None and arr.shape[0] != batch:
    raise ValueError(f'labels has {arr.shape[0]} entries but the ids have batch {batch}')
  top = num_classes + 1 if allow_null else num_classes
  if arr.min() < 0 or arr.max() >= top:
    rule = (f'[0, {num_classes}] ({num_classes} = the null class)' if allow_null else
            f'[0, {num_classes}) (num_classes={num_classes}; the null class {num_classes} '
            'needs allow_null_class=True)')
    raise ValueError(f'labels must be in {rule}, got values in [{arr.min()}, {arr.max()}]')
  return jnp.asarray(arr, jnp.int32)


# The VQ-VAE's programs take the convolutional networks' XLA options (on CPU: Eigen's
# convolutions, `xla_cpu.conv_net_options`).
@functools.lru_cache(maxsize=None)
def _jit_encode(tok):
  return jax.jit(tok.img_to_ids, compiler_options=xla_cpu.conv_net_options())


@functools.lru_cache(maxsize=None)
def _jit_decode(tok):
  return jax.jit(lambda p, ids: (tok.ids_to_img(p, ids) + 1.0) * 0.5,
                 compiler_options=xla_cpu.conv_net_options())


@functools.lru_cache(maxsize=None)
def _jit_teacher(tok):
  return jax.jit(tok.ids_to_teacher_input, compiler_options=xla_cpu.conv_net_options())


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
                    dtype: str | None = None, decoder_dtype: str | None = None,
                    param_dtype: str | None = None) -> MVARPipeline:
  """Reads `vqvae.{msgpack,json}` and `transformer.{msgpack,json}` from `directory`.

  `attention` overrides the stored attention settings (e.g. AttentionConfig(mode='var')
  to run a VAR checkpoint as VAR, or another neighbourhood implementation). `dtype`: the
  transformer's compute dtype; `decoder_dtype`: the VQ-VAE decoder's; `param_dtype`: a cast
  copy of the transformer params for inference (half their memory; each tensor cast on the
  host as it is read, `to_device`, rounded as `sampling.inference_params` rounds), and of the decode's conv params in the decoder's dtype when that is 16-bit
  (`Tokenizer.cast_for_decode`; the encoder keeps fp32). On a GPU, 'bfloat16' for all three
  is the fast setting. None keeps what the directory stores (fp32).
  """
  if param_dtype is not None and param_dtype not in DTYPES:
    raise ValueError(f'param_dtype must be one of {tuple(DTYPES)} or None, '
                     f'got {param_dtype!r}')
  v_cfg, v_params = load_converted(directory, 'vqvae')
  if decoder_dtype is not None:
    v_cfg = dataclasses.replace(v_cfg, decoder_dtype=decoder_dtype)
  # param_dtype: each tensor is cast on the host as it is read, so the device never holds
  # the fp32 transformer next to its cast copy (on an H100, d16: 1.2 GB more at the peak).
  t_cfg, t_params = load_converted(directory, 'transformer', dtype=param_dtype)
  overrides = {}
  if attention is not None:
    overrides['attention'] = attention
  if dtype is not None:
    overrides['dtype'] = dtype
  if overrides:
    t_cfg = dataclasses.replace(t_cfg, **overrides).validate()
  if param_dtype is not None:
    v_params = vqvae.Tokenizer(v_cfg).cast_for_decode(v_params)
  return MVARPipeline(v_cfg, v_params, t_cfg, t_params)


def host_cast(dtype: str):
  """A host array -> host array function casting to `dtype` (the rounding of
  `sampling.inference_params` on the device)."""
  return lambda a: np.asarray(a).astype(jnp.dtype(dtype))


def to_device(dtype: str | None = None):
  """A host array -> device array function, cast to `dtype` on the host first (None: as it
  is), so that the device never holds a tensor in two dtypes."""
  if dtype is None:
    return jnp.asarray
  cast = host_cast(dtype)
  return lambda a: jnp.asarray(cast(a))


def load_converted(directory: str, name: str, dtype: str | None = None):
  """(config, params) of one converted model (`name` is 'vqvae' or 'transformer').

  dtype: every tensor cast to it on the host before it goes to the device (as
  `sampling.inference_params` would on the device, with the same rounding); None: as stored.
  """
  from mvar_jax import checkpointing
  from mvar_jax import converted_io
  # Each tensor goes to the device as it is read: one host copy of one tensor at a time.
  cfg_dict, params = converted_io.read_converted(directory, name, leaf_fn=to_device(dtype))
  cfg = config_from_dict(cfg_dict)
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
  import flax.linen as nn
  from mvar_jax import checkpointing, transformer
  init = transformer.init_params if name == 'transformer' else vqvae.init_params
  abstract = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))['params']
  checkpointing.check_tree_matches(params, nn.unbox(abstract), f'{name} ({path})')
