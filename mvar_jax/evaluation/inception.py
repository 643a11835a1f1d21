"""The FID Inception v3 network (the 2015-12-05 TensorFlow graph) in Flax.

    net = FIDInception(InceptionConfig())                # preprocess='adm' by default
    feats = net.apply({'params': params}, images_BHW3)   # uint8 or float in [0, 255], any size
    feats['pool']     # (B, 2048)  pool_3: FID, precision and recall
    feats['spatial']  # (B, 2023)  mixed_6/conv, first 7 channels, 17x17x7 flattened HWC: sFID
    feats['logits']   # (B, 1008)  softmax/logits: Inception Score

    python -m mvar_jax.evaluation.inception --pth pt_inception-2015-12-05-6726825d.pth \
        --out weights/inception       # once; torch is needed only for this step

The architecture is torchvision's Inception3 with pytorch-fid's FID blocks (average pools
that do not count padding; a max pool in the last block, as the TF graph has it), and module
names are torchvision's, so the converter is the repository's one naming rule
(`mvar_jax.convert.state_dict_to_params`). TF's 'mixed_6' is torchvision's Mixed_6d, and
'mixed_6/conv' is the ReLU output of its 1x1 branch.

`preprocess` picks which reference the network reproduces:
- 'adm' (default): the ADM evaluator's graph, whose statistics papers report and whose
  reference batches hold precomputed mu/sigma: TF1 bilinear resize to 299 (no half-pixel
  shift) on [0, 255], then (x - 128) / 128; logits = pool @ W without the bias, as ADM's
  softmax graph reads only the MatMul's weight.
- 'pytorch_fid': pytorch-fid's InceptionV3: torch bilinear resize (half-pixel centres) of
  x / 255, then 2x - 1; logits = pool @ W + b (torchvision's fc).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax import resize

PREPROCESS = ('adm', 'pytorch_fid')
PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'default': jax.lax.Precision.DEFAULT}
NUM_LOGITS = 1008  # the 2015 graph's classifier (1000 ImageNet classes + 8 unused)
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 of mixed_6/conv's 192 channels
INPUT_SIZE = 299
BN_EPS = 1e-3  # torchvision's BasicConv2d (the TF graph's value)


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  preprocess: str = 'adm'  # 'adm' (the ADM evaluator's graph) | 'pytorch_fid'
  # 'highest' keeps fp32 convolutions exact on GPUs (no TF32), which FID needs to match the
  # reference to ~1e-5; 'default' lets XLA use TF32 (about 7x the H100 throughput).
  precision: str = 'highest'

  def validate(self) -> 'InceptionConfig':
    if self.preprocess not in PREPROCESS:
      raise ValueError(f'inception preprocess must be one of {PREPROCESS}, got {self.preprocess!r}')
    if self.precision not in PRECISIONS:
      raise ValueError(f'inception precision must be one of {tuple(PRECISIONS)}, '
                       f'got {self.precision!r}')
    return self


class FrozenBatchNorm(nn.Module):
  """Inference batch norm with torch's parameter names (scale, bias, running_mean/var)."""

  features: int

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    mean = self.param('running_mean', nn.initializers.zeros, (self.features,))
    var = self.param('running_var', nn.initializers.ones, (self.features,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm -> ReLU; `padding` is torch's symmetric (ph, pw)."""

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=self.precision, name='conv')(x)
    return nn.relu(FrozenBatchNorm(self.features, name='bn')(x))


def _avg_pool_3x3(x):
  # TF's SAME average pool divides by the number of real (unpadded) pixels.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b/c/d)."""

  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, (1, 1), name='branch1x1')(x)
    b5 = conv(48, (1, 1), name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, (3, 3), stride=2, name='branch3x3')(x)
    bd = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b..e).

  Returns (output, branch1x1): Mixed_6d's branch1x1 is TF's 'mixed_6/conv' (sFID).
  """

  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name='branch1x1')(x)
    b7 = conv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, (1, 1), name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), stride=2, name='branch3x3_2')(b3)
    b7 = conv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 branches (Mixed_7b: average pool, Mixed_7c: max pool)."""

  pool: str  # 'avg' | 'max' (the 2015 graph's last block max-pools)
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(320, (1, 1), name='branch1x1')(x)
    b3 = conv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    else:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = conv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images_BHW3, kind: str) -> jax.Array:
  """uint8 or float [0, 255] images of any size -> (B, 299, 299, 3) network input in [-1, 1]."""
  x = jnp.asarray(images_BHW3).astype(jnp.float32)
  if kind == 'adm':
    x = resize.resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) / 128.0
  x = resize.resize_bilinear(x / 255.0, (INPUT_SIZE, INPUT_SIZE))
  return 2.0 * x - 1.0


class FIDInception(nn.Module):
  """Images (B, H, W, 3) in [0, 255] -> {'pool': (B, 2048), 'spatial': (B, 2023), 'logits': (B, 1008)}."""

  config: InceptionConfig = InceptionConfig()

  @nn.compact
  def __call__(self, images_BHW3):
    cfg = self.config
    p = PRECISIONS[cfg.precision]
    conv = functools.partial(BasicConv, precision=p)
    x = preprocess(images_BHW3, cfg.preprocess)
    x = conv(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)  # 149
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)  # 147
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)  # 73
    x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)  # 71
    x = _max_pool_3x3_s2(x)  # 35
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features, precision=p, name=name)(x)
    x = InceptionB(precision=p, name='Mixed_6a')(x)  # 17
    spatial_BHWC = None
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x, branch1x1 = InceptionC(c7, precision=p, name=name)(x)
      if name == 'Mixed_6d':
        spatial_BHWC = branch1x1[..., :SPATIAL_CHANNELS]
    x = InceptionD(precision=p, name='Mixed_7a')(x)  # 8
    x = InceptionE('avg', precision=p, name='Mixed_7b')(x)
    x = InceptionE('max', precision=p, name='Mixed_7c')(x)
    pool_BD = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, precision=p, name='fc')
    logits = fc(pool_BD)
    if cfg.preprocess == 'adm':  # ADM's softmax graph multiplies by the weight alone
      logits = jnp.dot(pool_BD, fc.variables['params']['kernel'], precision=p)
    b = pool_BD.shape[0]
    return {'pool': pool_BD, 'spatial': spatial_BHWC.reshape(b, -1), 'logits': logits}


def init_params(config: InceptionConfig, key) -> dict:
  """Flax's default initialisation (see `random_params` for well-scaled random weights)."""
  images = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.jit(FIDInception(config.validate()).init)(key, images)['params']


@functools.lru_cache(maxsize=1)
def abstract_params() -> dict:
  """ShapeDtypeStructs of the parameter tree (no compute; traced once, shared: do not edit)."""
  return jax.eval_shape(lambda: init_params(InceptionConfig(), jax.random.key(0)))


def random_params(seed: int = 0) -> dict:
  """Random, well-scaled parameters drawn on the host (tests, the notebook; no download).

  He-normal kernels and batch-norm statistics near identity keep the features O(1) through
  the 94 convolutions and the classifier (Flax's default init with unit statistics lets them grow ~10x per
  block). Drawn with numpy from the abstract tree: no 299 px forward pass is run.
  """
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
    if name in ('scale', 'running_var'):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)  # bias, running_mean

  return jax.tree_util.tree_map_with_path(one, abstract_params())


# ----------------------------------------------------------------------------- converter

def params_from_state_dict(state_dict) -> dict:
  """pytorch-fid's FID Inception state dict (numpy) -> our params tree, checked key by key."""
  from mvar_jax import convert
  sd = {k: v for k, v in state_dict.items()
        if not k.endswith('num_batches_tracked') and not k.startswith('AuxLogits.')}
  return convert.state_dict_to_params(sd, abstract_params(),
                                      'FID Inception (pt_inception-2015-12-05)')


def convert_pth(path: str) -> dict:
  """Reads `pt_inception-2015-12-05-*.pth` (torch, weights_only) into our params tree."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'Inception weights not found: {path} (pytorch-fid\'s '
                            'pt_inception-2015-12-05-6726825d.pth, downloaded once by the user)')
  import torch  # only here
  obj = torch.load(path, map_location='cpu', weights_only=True)
  sd = {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, 'detach')}
  return params_from_state_dict(sd)


def load_params(path: str) -> dict:
  """Params from a `.pth` file (converted on the fly) or a directory written by `main`."""
  from mvar_jax import checkpointing
  if path.endswith('.pth'):
    return convert_pth(path)
  _, params = checkpointing.load_converted(path, 'inception')
  where = os.path.join(path, 'inception.msgpack')
  checkpointing.check_tree_matches(params, abstract_params(), f'FID Inception ({where})')
  return params


def main(argv=None) -> None:
  import argparse
  from mvar_jax import convert
  parser = argparse.ArgumentParser(description='Convert pytorch-fid Inception weights.')
  parser.add_argument('--pth', required=True, help='pt_inception-2015-12-05-6726825d.pth')
  parser.add_argument('--out', required=True, help='output directory (inception.msgpack/json)')
  args = parser.parse_args(argv)
  convert.save_converted(args.out, 'inception', InceptionConfig(), convert_pth(args.pth))
  print(f'wrote {args.out}/inception.msgpack')


if __name__ == '__main__':
  main()
