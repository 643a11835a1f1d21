"""LPIPS perceptual distance (v0.1, VGG16 trunk) in Flax, as the `lpips` package computes it.

    python -m mvar_jax.lpips --vgg16 vgg16-397923af.pth --out weights/   # -> weights/lpips_vgg.msgpack

d(x, y) = sum_l mean_hw( w_l . (n(f_l(s(x))) - n(f_l(s(y))))^2 ), with s the fixed input
scaling ((x - shift) / scale, images in [-1, 1]), f_l the VGG16 activations relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3, n a unit-norm over channels and w_l the learned 1x1 heads (no bias).

Weights are never downloaded: the VGG16 trunk comes from torchvision's ImageNet state dict
(a file the user supplies) and the five heads from the `lpips` package's wheel, read from
the installed package at conversion time (`lpips/weights/v0.1/vgg.pth`, not committed here).
Parameter names keep the upstream ones (`features_<index>` for torchvision's
`features.<index>`, `lin<k>` for the heads) so the converter is the repository's naming rule.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax import atomic_file
from mvar_jax import convert

# Input scaling of lpips v0.1 (its ScalingLayer): ImageNet statistics mapped to [-1, 1] inputs.
SHIFT_C = (-0.030, -0.088, -0.188)
SCALE_C = (0.458, 0.448, 0.450)
# torchvision vgg16 cfg 'D': (width, convs) per block; a 2x2 max-pool precedes blocks 2..5.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
TAPS = ('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3', 'relu5_3')
_PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'default': jax.lax.Precision.DEFAULT}


def vgg16_conv_indices() -> list[int]:
  """torchvision `features.<i>` indices of the 13 convs up to relu5_3 (conv, relu, ..., pool)."""
  out, i = [], 0
  for block, (_, convs) in enumerate(VGG16_BLOCKS):
    i += 1 if block else 0  # the max-pool layer before this block
    for _ in range(convs):
      out.append(i)
      i += 2  # conv, relu
  return out


class VGG16Features(nn.Module):
  """VGG16 trunk; (B, H, W, 3) scaled images -> the five tapped activations (B, h_l, w_l, C_l)."""

  precision: str = 'highest'

  @nn.compact
  def __call__(self, x_BHWC) -> list[jax.Array]:
    taps, names = [], iter(vgg16_conv_indices())
    for block, (width, convs) in enumerate(VGG16_BLOCKS):
      if block:
        x_BHWC = nn.max_pool(x_BHWC, (2, 2), strides=(2, 2), padding='VALID')
      for _ in range(convs):
        x_BHWC = nn.relu(nn.Conv(width, (3, 3), padding=1, name=f'features_{next(names)}',
                                 precision=_PRECISIONS[self.precision])(x_BHWC))
      taps.append(x_BHWC)
    return taps


def _unit_normalize(f_BHWC, eps: float = 1e-10):
  # lpips adds eps to the norm (not inside the sqrt); kept for equality with the package.
  return f_BHWC / (jnp.sqrt(jnp.sum(jnp.square(f_BHWC), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS distance: two image batches (B, H, W, 3) in [-1, 1] -> (B,) float32."""

  precision: str = 'highest'  # conv precision; 'default' is faster on accelerators

  @nn.compact
  def __call__(self, x_BHWC, y_BHWC):
    if x_BHWC.shape != y_BHWC.shape or x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3:
      raise ValueError(f'LPIPS needs two (B, H, W, 3) batches of one shape, got {x_BHWC.shape} '
                       f'and {y_BHWC.shape}')
    if self.precision not in _PRECISIONS:
      raise ValueError(f'precision must be one of {tuple(_PRECISIONS)}, got {self.precision!r}')
    shift, scale = jnp.asarray(SHIFT_C), jnp.asarray(SCALE_C)
    # One trunk pass over both batches: same weights, half the dispatches.
    both = (jnp.concatenate([x_BHWC, y_BHWC]) - shift) / scale
    feats = VGG16Features(self.precision, name='net')(both)
    b = x_BHWC.shape[0]
    total_B = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(feats):
      diff = jnp.square(_unit_normalize(f[:b]) - _unit_normalize(f[b:]))
      head = nn.Conv(1, (1, 1), use_bias=False, name=f'lin{k}',
                     precision=_PRECISIONS[self.precision])(diff)
      total_B = total_B + jnp.mean(head, axis=(1, 2, 3))
    return total_B


def init_params(rng, precision: str = 'highest') -> dict:
  """Random trunk and heads (flax default init); for shapes, tests and fixed-feature metrics."""
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.jit(LPIPS(precision).init)(rng, x, x)['params']


def random_params(seed: int = 0) -> tuple[dict, str]:
  """(params, where the heads came from): a random He-initialised VGG16 trunk and the
  `lpips` package's heads when it is installed (else random non-negative ones).

  A fixed feature metric for tests and the demo comparison when the ImageNet VGG16 file
  is absent (nothing is downloaded); not the calibrated LPIPS. Drawn with numpy from the
  abstract tree: nothing is compiled.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(jax.random.key(0)))
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)
  for p in params['net'].values():
    k = p['kernel']
    p['kernel'] = (rng.standard_normal(k.shape) * np.sqrt(2.0 / np.prod(k.shape[:3]))).astype(
        np.float32)
  try:
    heads = convert.extract_state_dict(convert.load_torch_file(package_heads_path()))
    for k in range(len(TAPS)):
      params[f'lin{k}']['kernel'] = heads[f'lin{k}.model.1.weight'].transpose(2, 3, 1, 0)
    source = 'lpips package heads'
  except (FileNotFoundError, ImportError):
    for k in range(len(TAPS)):
      shape = params[f'lin{k}']['kernel'].shape
      params[f'lin{k}']['kernel'] = np.abs(0.1 * rng.standard_normal(shape)).astype(np.float32)
    source = 'random non-negative heads (lpips package not installed)'
  return jax.tree_util.tree_map(jnp.asarray, params), source


# ----------------------------------------------------------------------------- weights

def package_heads_path() -> str:
  """Path of the heads the `lpips` package ships (`weights/v0.1/vgg.pth`), found without
  importing it (its import pulls in torchvision)."""
  spec = importlib.util.find_spec('lpips')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('the LPIPS heads come from the `lpips` package: pip install lpips '
                            '(or pass the heads file explicitly)')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'weights', 'v0.1', 'vgg.pth')
  if not os.path.exists(path):
    raise FileNotFoundError(f'the installed lpips package has no {path}')
  return path


def lpips_state_dict(vgg16_sd: Mapping[str, np.ndarray],
                     heads_sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Merges torchvision vgg16 keys (`features.<i>.*`, classifier dropped) and lpips head keys
  (`lin<k>.model.1.weight`, or `lin<k>.weight`) into one state dict for `convert_lpips`
  (trunk keys become `net.features.<i>.*`, the Flax trunk's path)."""
  convs = set(vgg16_conv_indices())
  out = {}
  for k, v in vgg16_sd.items():
    parts = k.split('.')
    if parts[0] == 'features' and int(parts[1]) in convs:
      out[f'net.{k}'] = v
  for k, v in heads_sd.items():
    parts = k.split('.')
    if parts[0].startswith('lin'):
      out[f'{parts[0]}.{parts[-1]}'] = v  # drop the Dropout/Sequential index
  return out


def convert_lpips(vgg16_sd: Mapping[str, np.ndarray], heads_sd: Mapping[str, np.ndarray]) -> dict:
  """LPIPS params from torchvision's vgg16 state dict and the lpips v0.1 vgg heads."""
  abstract = jax.eval_shape(lambda: init_params(jax.random.key(0)))
  return convert.state_dict_to_params(lpips_state_dict(vgg16_sd, heads_sd), abstract, 'lpips')


def save_params(path: str, params) -> None:
  from flax import serialization
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  blob = serialization.msgpack_serialize(convert.jax_tree_to_numpy(params))
  atomic_file.write_atomically(path, lambda f: f.write(blob))


def load_params(path: str) -> dict:
  """Params written by `save_params` / this module's CLI, checked against the architecture."""
  from flax import serialization
  if not os.path.exists(path):
    raise FileNotFoundError(f'LPIPS weights not found: {path} (make them with '
                            '`python -m mvar_jax.lpips --vgg16 <torchvision vgg16 .pth> --out DIR`)')
  with open(path, 'rb') as f:
    params = serialization.msgpack_restore(f.read())
  want = jax.eval_shape(lambda: init_params(jax.random.key(0)))
  got_shapes = jax.tree_util.tree_map(np.shape, params)
  want_shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), want)
  if got_shapes != want_shapes:
    raise convert.CheckpointMismatchError(f'lpips ({path})')
  return jax.tree_util.tree_map(jnp.asarray, params)


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--vgg16', default=None,
                      help="torchvision vgg16 ImageNet weights (e.g. vgg16-397923af.pth)")
  parser.add_argument('--heads', default=None,
                      help='lpips v0.1 vgg heads (default: the installed lpips package\'s)')
  parser.add_argument('--random_trunk_seed', type=int, default=None,
                      help='instead of --vgg16: a random VGG16 trunk (a fixed feature metric, '
                           'not the calibrated LPIPS; what the demo recipe was tuned with)')
  parser.add_argument('--out', required=True, help='output directory')
  args = parser.parse_args(argv)
  if (args.vgg16 is None) == (args.random_trunk_seed is None):
    parser.error('give exactly one of --vgg16 and --random_trunk_seed')
  out = os.path.join(args.out, 'lpips_vgg.msgpack')
  if args.vgg16 is None:
    params, heads_source = random_params(args.random_trunk_seed)
    save_params(out, params)
    print(f'lpips (random vgg16 trunk, seed {args.random_trunk_seed}, {heads_source}) -> {out}')
    return
  vgg = convert.extract_state_dict(convert.load_torch_file(args.vgg16))
  heads = convert.extract_state_dict(convert.load_torch_file(args.heads or package_heads_path()))
  params = convert_lpips(vgg, heads)
  save_params(out, params)
  print(f'lpips (vgg16, v0.1) -> {out}')


if __name__ == '__main__':
  main()
