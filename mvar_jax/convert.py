"""Converters for the official PyTorch checkpoints (VAR's VQ-VAE, VAR and MVAR transformers).

    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --transformer mvar_d16.pth --out weights/

writes `weights/{vqvae,transformer}.{msgpack,json,manifest.json}` (see `mvar_jax.converted_io`),
which `mvar_jax.api.load_pretrained` reads in one call. The .pth is memory-mapped and converted
one tensor at a time (`convert_file`). From Python: `convert_transformer(state_dict)`,
`convert_vqvae(state_dict)`.

Loading never runs code from the file: `torch.load(weights_only=True)` with a short allow-list
(`_allowed_globals`); a file that needs more is refused unless `--trust_pickle` is given.

The mapping is one naming rule, validated against a freshly initialised abstract tree:
torch key `blocks.3.attn.mat_qkv.weight` -> flax path ('blocks_3', 'attn', 'mat_qkv', 'kernel')
(numeric segments join the previous name; `ada_lin.1` -> `ada_lin`, the SiLU at index 0
holds no weights), and the leaf `weight` becomes `kernel` (Linear (out,in) -> (in,out),
conv OIHW -> HWIO), `embedding` (Embedding) or `scale` (GroupNorm). Torch is imported
only when reading a .pth file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np

# Buffers of the official modules that hold no learned state.
IGNORED_KEYS = re.compile(
    r'(^|\.)(lvl_1L|attn_bias_for_masking|zero_k_bias|ema_vocab_hit_SV)$')
# Module renames applied after joining numeric segments.
_RENAMES = ((re.compile(r'^ada_lin_1$'), 'ada_lin'),)


class CheckpointMismatchError(ValueError):
  """A state dict that does not fit the architecture; lists every offending key."""

  def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    lines = [f'{what}: checkpoint does not match the architecture.']
    if self.missing:
      lines.append(f'  missing ({len(self.missing)}): ' + ', '.join(self.missing[:20]))
    if self.unexpected:
      lines.append(f'  unexpected ({len(self.unexpected)}): ' + ', '.join(self.unexpected[:20]))
    if self.misshaped:
      lines.append(f'  mis-shaped ({len(self.misshaped)}): ' + ', '.join(
          f'{k} {a} vs expected {b}' for k, a, b in self.misshaped[:20]))
    super().__init__('\n'.join(lines))


# ----------------------------------------------------------------------------- reading

class UnsafeCheckpointError(ValueError):
  """A .pth whose pickle needs more than tensors, plain containers and the allowed globals."""


def _allowed_globals() -> list:
  """Python globals beyond torch's defaults that checkpoints of the official code pickle.

  The official trainers save {'epoch', 'iter', 'trainer': {...state dicts...}, 'args': ...}:
  `args` is an OrderedDict of plain values (torch allows those by default) in VAR/MVAR's
  `Args.state_dict()`, an `argparse.Namespace` in scripts that save `args` itself, and metric
  values that went through numpy are numpy scalars. Nothing on this list runs code when
  unpickled: a Namespace is a plain attribute bag, the numpy entries rebuild a number.
  """
  import argparse
  try:
    from numpy._core.multiarray import scalar  # numpy >= 2
  except ImportError:
    from numpy.core.multiarray import scalar
  out = [argparse.Namespace, np.dtype,
         # numpy 1 pickles `numpy.core.multiarray.scalar`, numpy 2 `numpy._core.multiarray.scalar`.
         (scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar')]
  out += [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
  return out


def load_torch_file(path: str, *, trust_pickle: bool = False, mmap: bool = True) -> dict[str, Any]:
  """Reads a .pth file into a (possibly nested) dict on the CPU, without running its code.

  Always `weights_only=True` (tensors, containers, plain values and `_allowed_globals()`);
  anything else raises UnsafeCheckpointError naming what it needs and the opt-in,
  `trust_pickle=True` (`--trust_pickle` on the command line), which unpickles everything and
  so runs whatever code the file holds. mmap=True maps the file instead of reading it (zip
  format, the default since torch 1.6): tensors are paged in as they are converted.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  import pickle
  import torch  # only here: the rest of the package never needs torch

  def load(**kw):
    try:
      return torch.load(path, map_location='cpu', mmap=mmap, **kw)
    except RuntimeError as e:
      if mmap and 'mmap' in str(e):  # the legacy (pre-zip) format cannot be mapped
        return torch.load(path, map_location='cpu', **kw)
      raise

  if trust_pickle:
    return load(weights_only=False)
  try:
    with torch.serialization.safe_globals(_allowed_globals()):
      return load(weights_only=True)
  except pickle.UnpicklingError as e:
    try:  # every global the file names (zip format only)
      needs = ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # pylint: disable=broad-except
      needs = ''
    # Otherwise the first one torch stopped at ("Unsupported global: GLOBAL builtins.exec").
    needs = needs or ', '.join(re.findall(r'GLOBAL ([\w.]+)', str(e))[:1]) or 'unknown'
    raise UnsafeCheckpointError(
        f'{path}: refused to unpickle: the file needs Python objects beyond tensors and plain '
        f'values ({needs}), and unpickling them can run arbitrary code. If you trust where the '
        'file came from, pass --trust_pickle (trust_pickle=True in Python).') from e


def _to_numpy32(v) -> np.ndarray:
  """float32 numpy view of a tensor or array (a copy only when the dtype differs)."""
  if hasattr(v, 'detach'):
    v = v.detach()
    v = v.numpy() if v.dtype == _torch_float32() else v.float().numpy()
  return np.asarray(v, np.float32)


def _torch_float32():
  import torch
  return torch.float32


def extract_state_dict(obj: Mapping[str, Any], *, lazy: bool = False) -> dict[str, Any]:
  """The flat state dict of a release file or a training checkpoint, as numpy float32.

  lazy=True keeps the tensors as they are (e.g. memory-mapped) for `convert_file`, which
  converts one at a time.
  """
  for keys in (('mvar_wo_ddp',), ('trainer', 'mvar_wo_ddp'), ('var_wo_ddp',),
               ('trainer', 'var_wo_ddp'), ('vae_local',), ('trainer', 'vae_local'),
               ('state_dict',), ('model',)):
    cur = obj
    for k in keys:
      cur = cur.get(k) if isinstance(cur, Mapping) else None
    if isinstance(cur, Mapping):
      obj = cur
      break
  out = {}
  for k, v in obj.items():
    k = k[len('module.'):] if k.startswith('module.') else k
    if hasattr(v, 'detach') or isinstance(v, np.ndarray):
      out[k] = v if lazy else _to_numpy32(v)
  if not out:
    raise ValueError('no tensors found in the checkpoint (expected a state dict, or one under '
                     "'mvar_wo_ddp' or 'trainer.mvar_wo_ddp')")
  return out


# ----------------------------------------------------------------------------- naming rule

def torch_key_to_path(key: str) -> tuple[str, ...]:
  """'blocks.3.attn.mat_qkv.weight' -> ('blocks_3', 'attn', 'mat_qkv', 'weight')."""
  path: list[str] = []
  for seg in key.split('.'):
    if seg.isdigit() and path:
      path[-1] = f'{path[-1]}_{seg}'
    else:
      path.append(seg)
  for i, seg in enumerate(path[:-1]):
    for pattern, new in _RENAMES:
      if pattern.match(seg):
        path[i] = new
  return tuple(path)


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    cur = tree
    for k in path[:-1]:
      cur = cur.setdefault(k, {})
    cur[path[-1]] = v
  return tree


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return value


def _to_torch(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  return value


def plan_params(state_dict: Mapping[str, Any], abstract_params, what: str
                ) -> dict[tuple[str, ...], str]:
  """flax path -> torch key for every leaf of `abstract_params`, checked on shapes alone.

  Reads only `.shape` of the state dict's values, so memory-mapped tensors stay on disk.
  Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped key.
  """
  import flax.linen as nn
  target = {p: tuple(v.shape) for p, v in _flatten(nn.unbox(abstract_params)).items()}
  plan, unexpected, misshaped, seen_misshaped = {}, [], [], set()
  for key, value in state_dict.items():
    if IGNORED_KEYS.search(key):
      continue
    path = torch_key_to_path(key)
    if path[-1] == 'weight':
      candidates = [path[:-1] + (leaf,) for leaf in ('kernel', 'embedding', 'scale')]
      path = next((c for c in candidates if c in target), path)
    if path not in target:
      unexpected.append(key)
      continue
    shape = tuple(value.shape)
    expected = tuple(_to_torch(np.broadcast_to(np.float32(0), target[path]), path[-1]).shape)
    if shape != expected:
      # Reported in the checkpoint's (torch) layout, like the key it names.
      misshaped.append((key, shape, expected))
      seen_misshaped.add(path)
      continue
    plan[path] = key
  missing = ['/'.join(p) for p in target if p not in plan and p not in seen_misshaped]
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError(what, missing, unexpected, misshaped)
  return plan


def state_dict_to_params(state_dict: Mapping[str, Any], abstract_params, what: str) -> dict:
  """Maps a flat torch state dict onto the tree of `abstract_params` (shapes only)."""
  plan = plan_params(state_dict, abstract_params, what)
  return _unflatten({p: _to_flax(_to_numpy32(state_dict[k]), p[-1]) for p, k in plan.items()})


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  """Inverse of the naming rule (flax tree -> official key names), e.g. to export."""
  import flax.linen as nn
  out = {}
  for path, v in _flatten(nn.unbox(params)).items():
    leaf = path[-1]
    parts = []
    for parent, seg in zip(('',) + path[:-2], path[:-1]):
      if seg == 'ada_lin':
        parts.append('ada_lin.1')
        continue
      m = re.match(r'^(.*)_(\d+)$', seg)
      # `mid.block_1` / `mid.attn_1` are attribute names upstream, not list members.
      indexed = m and m.group(1) in _INDEXED and parent != 'mid'
      parts.append(f'{m.group(1)}.{m.group(2)}' if indexed else seg)
    name = {'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight'}.get(leaf, leaf)
    out['.'.join(parts + [name])] = _to_torch(np.asarray(v), leaf)
  return out


# Module names that the official code indexes with a number (nn.ModuleList members).
_INDEXED = {'blocks', 'down', 'up', 'block', 'attn', 'qresi_ls'}


# ----------------------------------------------------------------------------- transformer

def infer_transformer_config(state_dict: Mapping[str, np.ndarray], **overrides):
  """Depth, width, heads, vocabulary, classes and MLP ratio read off the tensor shapes."""
  from mvar_jax import transformer as tfm
  from mvar_jax.layout import DEFAULT_PATCH_NUMS, ScaleLayout
  need = ('pos_1LC', 'class_emb.weight', 'word_embed.weight', 'head.weight',
          'blocks.0.attn.scale_mul_1H11', 'blocks.0.ffn.fc1.weight')
  absent = [k for k in need if k not in state_dict]
  if absent:
    raise CheckpointMismatchError('transformer', missing=absent)
  depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r'blocks\.(\d+)\.', k)))
  width = state_dict['pos_1LC'].shape[-1]
  kwargs = dict(
      depth=depth, width=width,
      num_heads=state_dict['blocks.0.attn.scale_mul_1H11'].shape[1],
      mlp_ratio=state_dict['blocks.0.ffn.fc1.weight'].shape[0] / width,
      num_classes=state_dict['class_emb.weight'].shape[0] - 1,
      vocab_size=state_dict['head.weight'].shape[0],
      cvae=state_dict['word_embed.weight'].shape[1],
      drop_path_rate=0.1 * depth / 24)
  kwargs.update(overrides)
  patch_nums = tuple(kwargs.get('patch_nums', DEFAULT_PATCH_NUMS))
  total = state_dict['pos_1LC'].shape[1]
  if ScaleLayout(patch_nums).total_len != total:
    raise CheckpointMismatchError('transformer', misshaped=[(
        'pos_1LC', tuple(state_dict['pos_1LC'].shape),
        f'(1, {ScaleLayout(patch_nums).total_len}, C) for patch_nums {patch_nums}; pass patch_nums')])
  return tfm.TransformerConfig(**kwargs).validate()


def convert_transformer(state_dict: Mapping[str, np.ndarray], config=None, **overrides):
  """(config, params) from a VAR or MVAR state dict; `config` is inferred when None."""
  import jax
  from mvar_jax import transformer as tfm
  config = config or infer_transformer_config(state_dict, **overrides)
  abstract = jax.eval_shape(lambda: tfm.init_params(config, jax.random.key(0)))['params']
  return config, state_dict_to_params(state_dict, abstract, 'transformer')


# ----------------------------------------------------------------------------- VQ-VAE

def infer_vqvae_config(state_dict: Mapping[str, np.ndarray], **overrides):
  """Channels, multipliers, depth, code width and vocabulary read off the tensor shapes."""
  from mvar_jax import vqvae
  need = ('encoder.conv_in.weight', 'quant_conv.weight', 'quantize.embedding.weight')
  absent = [k for k in need if k not in state_dict]
  if absent:
    raise CheckpointMismatchError('vqvae', missing=absent)
  ch = state_dict['encoder.conv_in.weight'].shape[0]
  levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r'encoder\.down\.(\d+)\.', k))})
  ch_mult = tuple(state_dict[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch for i in levels)
  num_res_blocks = 1 + max(int(m.group(1)) for k in state_dict
                           if (m := re.match(r'encoder\.down\.0\.block\.(\d+)\.', k)))
  num_phi = len({m.group(1) for k in state_dict if (m := re.match(r'quantize\.quant_resi\.qresi_ls\.(\d+)\.', k))})
  vocab, z = state_dict['quantize.embedding.weight'].shape
  kwargs = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z,
                vocab_size=vocab, num_phi=max(num_phi, 1))
  kwargs.update(overrides)
  return vqvae.VQVAEConfig(**kwargs)


def convert_vqvae(state_dict: Mapping[str, np.ndarray], config=None, **overrides):
  """(config, params) from VAR's VQ-VAE state dict; `config` is inferred when None."""
  import jax
  from mvar_jax import vqvae
  config = config or infer_vqvae_config(state_dict, **overrides)
  abstract = jax.eval_shape(lambda: vqvae.init_params(config, jax.random.key(0)))['params']
  return config, state_dict_to_params(state_dict, abstract, 'vqvae')


# ----------------------------------------------------------------------------- files

def save_converted(out_dir: str, name: str, config, params) -> None:
  """Writes `name.msgpack` (params), `name.json` (config) and `name.manifest.json` atomically."""
  import flax.linen as nn
  from mvar_jax import converted_io
  converted_io.write_converted(out_dir, name, config_to_dict(config), nn.unbox(params))


def convert_file(path: str, out_dir: str, kind: str, *, trust_pickle: bool = False, **overrides):
  """Converts a .pth into `out_dir/<kind>.*` one tensor at a time; returns the config.

  kind: 'transformer' or 'vqvae'. The .pth is memory-mapped; each tensor is read, converted
  (float32, flax layout) and written before the next, so peak memory stays about the file
  size (the mapped pages) instead of several copies of it.
  """
  if kind not in ('transformer', 'vqvae'):
    raise ValueError(f"kind must be 'transformer' or 'vqvae', got {kind!r}")
  import jax
  from mvar_jax import converted_io
  state_dict = extract_state_dict(load_torch_file(path, trust_pickle=trust_pickle), lazy=True)
  if kind == 'transformer':
    from mvar_jax import transformer as module
    config = infer_transformer_config(state_dict, **overrides)
  else:
    from mvar_jax import vqvae as module
    config = infer_vqvae_config(state_dict, **overrides)
  abstract = jax.eval_shape(lambda: module.init_params(config, jax.random.key(0)))['params']
  plan = plan_params(state_dict, abstract, kind)
  lazy_tree = _unflatten({p: (lambda k=k, leaf=p[-1]: _to_flax(_to_numpy32(state_dict[k]), leaf))
                          for p, k in plan.items()})
  converted_io.write_converted(out_dir, kind, config_to_dict(config), lazy_tree)
  return config


def config_to_dict(config) -> dict:
  d = dataclasses.asdict(config)
  d['_type'] = type(config).__name__
  return d


def jax_tree_to_numpy(tree):
  import jax
  import flax.linen as nn
  return jax.tree_util.tree_map(np.asarray, nn.unbox(tree))


def main(argv=None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--vae', help='VAR VQ-VAE .pth (vae_ch160v4096z32.pth)')
  parser.add_argument('--transformer', help='var_d*.pth or mvar*.pth')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--patch_nums', default=None, help='e.g. 1_2_3_4_5_6_8_10_13_16')
  parser.add_argument('--attention_mode', default='mvar', choices=('mvar', 'var'),
                      help="'mvar' (scale/spatial-Markov) or 'var' (VAR's block-causal attention)")
  parser.add_argument('--refine_step', type=int, default=8)
  parser.add_argument('--kernel_size', type=int, default=7)
  parser.add_argument('--trust_pickle', action='store_true',
                      help='unpickle arbitrary Python objects in the .pth files (this runs any '
                           'code they hold): only for files from a source you trust')
  args = parser.parse_args(argv)
  if not (args.vae or args.transformer):
    parser.error('give --vae and/or --transformer')
  overrides = {}
  if args.patch_nums:
    overrides['patch_nums'] = tuple(int(p) for p in args.patch_nums.split('_'))
  if args.vae:
    cfg = convert_file(args.vae, args.out, 'vqvae', trust_pickle=args.trust_pickle, **overrides)
    print(f'vqvae: {cfg} -> {args.out}/vqvae.msgpack')
  if args.transformer:
    from mvar_jax.attention import AttentionConfig
    attn = AttentionConfig(mode=args.attention_mode, refine_step=args.refine_step,
                           kernel_size=args.kernel_size)
    cfg = convert_file(args.transformer, args.out, 'transformer', trust_pickle=args.trust_pickle,
                       attention=attn, **overrides)
    print(f'transformer: depth {cfg.depth}, width {cfg.width} -> {args.out}/transformer.msgpack')


if __name__ == '__main__':
  main()
