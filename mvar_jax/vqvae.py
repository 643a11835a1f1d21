"""VAR's multi-scale residual VQ-VAE (the tokenizer), NHWC, checkpoint-compatible.

    tok = Tokenizer(VQVAEConfig())                 # params-first functions, jit-friendly
    ids = tok.img_to_ids(params, img_BHW3)          # K arrays (B, pn*pn) int32, img in [-1, 1]
    img_BHW3 = tok.ids_to_img(params, ids)          # clamped to [-1, 1]
    x_BLC = tok.ids_to_teacher_input(params, ids)   # (B, L - pn_0**2, Cvae) fp32

`Tokenizer` is a thin frozen (hashable, so a valid jit static argument) wrapper over
`VQVAE(config).apply(params, ..., method=VQVAE.<name>)`; both spellings are public.
`params` may be the bare parameter tree or {'params': tree}.

Encoding: f = quant_conv(encoder(img)); per scale k, z = area-resize(f_rest -> pn_k)
(the last scale uses f_rest as is), ids = argmin ||z - e||, h = Phi_k(bicubic-up(e[ids]))
(no resize at the last scale), f_hat += h, f_rest -= h. Decoding sums the same h.

Parameter names follow the official state dict under one rule (numeric segments
join the previous name: `encoder.down.0.block.1.conv1.weight` ->
encoder/down_0/block_1/conv1/kernel), so `mvar_jax.convert` needs no table. The
buffer `quantize.ema_vocab_hit_SV` has no counterpart: the training forward
returns per-scale code hit counts instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.kernels import pixel_sums as pixel_sums_kernel
from mvar_jax.layout import DEFAULT_PATCH_NUMS, ScaleLayout, phi_index
from mvar_jax.resize import resize_area, resize_bicubic

DECODER_DTYPES = ('float32', 'bfloat16', 'float16')
PRECISIONS = {'default': jax.lax.Precision.DEFAULT, 'high': jax.lax.Precision.HIGH,
              'highest': jax.lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Tokenizer architecture (frozen: a jit static argument). Validated on construction."""

  ch: int = 160  # base width of encoder and decoder
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multiplier per resolution level
  num_res_blocks: int = 2  # res blocks per encoder level (the decoder has one more)
  z_channels: int = 32  # Cvae: latent and code-vector width
  vocab_size: int = 4096  # V: codebook entries
  patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS  # side of each scale's token map
  num_phi: int = 4  # shared Phi convs (VAR's share_quant_resi; 1 = a single shared Phi)
  phi_ratio: float = 0.5  # Phi(h) = (1 - r) h + r conv3x3(h)
  beta: float = 0.25  # commitment weight of the VQ loss (VAE training only)
  using_sa: bool = True  # attention blocks at the lowest-resolution level
  using_mid_sa: bool = True  # attention block in the middle
  in_channels: int = 3  # image channels
  norm_groups: int = 32  # GroupNorm groups (every width must be divisible by it)
  image_size: int | None = None  # None: patch_nums[-1] * downsample
  precision: str = 'highest'  # convs and attention; 'default' allows TF32/bf16 passes (faster)
  # Activation dtype of `decode` (post_quant_conv and the decoder); params stay fp32 and
  # GroupNorm statistics are fp32. 'bfloat16' takes the decode of 32 images at 256 px from 57
  # to 38 ms on an H200, at ~1e-2 pixel error; official sampling decodes under fp16 autocast.
  # On CPU keep fp32 (bf16 convs there are emulated, slower).
  decoder_dtype: str = 'float32'
  eini: float = -1.0  # codebook init: <0 uniform(+-|eini|/V) (VAR), >0 trunc-normal std, 0 N(0, 1)

  def __post_init__(self):
    # JSON round trips hand back lists; tuples keep the config hashable.
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, 'patch_nums', tuple(int(p) for p in self.patch_nums))
    self.validate()

  @property
  def layout(self) -> ScaleLayout:
    return ScaleLayout(self.patch_nums)

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def resolution(self) -> int:
    """Image side in pixels."""
    return self.image_size or self.patch_nums[-1] * self.downsample

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(self.ch * m for m in self.ch_mult)

  def validate(self) -> 'VQVAEConfig':
    """Raises ValueError naming the field; returns self for chaining."""
    for name in ('ch', 'num_res_blocks', 'z_channels', 'vocab_size', 'num_phi', 'in_channels',
                 'norm_groups'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if not self.ch_mult or any(m < 1 for m in self.ch_mult):
      raise ValueError(f'ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}')
    for w in (self.ch,) + self.widths:
      if w % self.norm_groups:
        raise ValueError(f'ch * ch_mult gives width {w}, not divisible by norm_groups '
                         f'{self.norm_groups} (ch={self.ch}, ch_mult={self.ch_mult})')
    self.layout  # noqa: B018  (validates patch_nums: positive, strictly increasing)
    if self.image_size is not None and self.image_size != self.patch_nums[-1] * self.downsample:
      raise ValueError(f'image_size {self.image_size} / downsample {self.downsample} must equal '
                       f'patch_nums[-1] = {self.patch_nums[-1]}')
    if not 0.0 < self.phi_ratio <= 1.0:
      raise ValueError(f'phi_ratio must be in (0, 1], got {self.phi_ratio}')
    if self.beta < 0:
      raise ValueError(f'beta must be >= 0, got {self.beta}')
    if self.precision not in PRECISIONS:
      raise ValueError(f'precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}')
    if self.decoder_dtype not in DECODER_DTYPES:
      raise ValueError(f'decoder_dtype must be one of {DECODER_DTYPES}, got {self.decoder_dtype!r}')
    return self


# ----------------------------------------------------------------------------- layers

# torch's default conv init (uniform +-1/sqrt(fan_in)) and a zero bias, with logical axes.
CONV_KERNEL_INIT = nn.with_logical_partitioning(
    nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'), (None, None, 'vae_in', 'vae_out'))
CONV_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros, ('vae_out',))


def _conv(cfg: VQVAEConfig, features: int, kernel: int, name: str, *, stride: int = 1,
          padding: Any = None, dtype: Any = jnp.float32) -> nn.Conv:
  """Conv with torch's default weight init (uniform +-1/sqrt(fan_in)), zero bias.

  dtype: activation (computation) dtype; the params stay fp32.
  """
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(
      features, (kernel, kernel), strides=stride, padding=pad, name=name, dtype=dtype,
      precision=PRECISIONS[cfg.precision], kernel_init=CONV_KERNEL_INIT, bias_init=CONV_BIAS_INIT)


class GroupNorm(nn.Module):
  """GroupNorm of channels-last maps, statistics in fp32 from per-channel sums.

  Params `scale` and `bias` (C,), as flax's nn.GroupNorm (same checkpoints). The pixel sums
  are taken per (image, channel), then per group. Two passes (mean, then the centred second
  moment), as torch, and as fast as flax's on an H200; `single_pass` takes E[x^2] - E[x]^2
  from one pass instead, for bf16 activations, whose rounding is far coarser than its
  cancellation: a bf16 decode chunk of 8 images at 256 px ran 4% faster (9.6 vs 10.0 ms,
  launch/bench_fusions.py --parts=gn). The single pass sums rows of `SUM_ROWS` pixels
  (a minor dimension of SUM_ROWS * C, not C = 160, for XLA's column reduction): 9.27 vs
  9.54 ms on an H100 (launch/results/h100_2026-11-26.md). Even so XLA read the 256 px map
  at ~0.9 TB/s: on a GPU the single pass's sums are one Pallas kernel (`sums`).
  """

  SUM_ROWS = 16  # pixels per row of the single pass's sums (when it divides the pixels)

  num_groups: int
  epsilon: float = 1e-6
  dtype: Any = jnp.float32  # output
  single_pass: bool = False
  # The single pass's sums: 'xla', 'pallas' (`kernels.pixel_sums`, one kernel reading the map
  # at full width; maps it cannot take fall back to XLA) or 'auto' (pallas on GPU).
  sums: str = 'auto'

  @nn.compact
  def __call__(self, x_BHWC):
    b, c = x_BHWC.shape[0], x_BHWC.shape[-1]
    g = self.num_groups
    if c % g:
      raise ValueError(f'GroupNorm: {c} channels are not divisible by {g} groups')
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('vae_out',)),
                       (c,), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vae_out',)),
                      (c,), jnp.float32)
    n = x_BHWC.size // (b * g)  # elements per (image, group)
    pixels = tuple(range(1, x_BHWC.ndim - 1))
    x32 = x_BHWC.astype(jnp.float32)
    per_group = lambda s_BC: jnp.repeat(s_BC.reshape(b, g, c // g).sum(-1) / n, c // g, axis=-1)
    expand = lambda s_BC: s_BC.reshape((b,) + (1,) * len(pixels) + (c,))
    if self.single_pass:
      sum_BC, sumsq_BC = pixel_sums(x_BHWC, self.SUM_ROWS, self.sums)
      mean_BC = per_group(sum_BC)
      var_BC = jnp.maximum(per_group(sumsq_BC) - mean_BC ** 2, 0.0)
    else:
      mean_BC = per_group(jnp.sum(x32, axis=pixels))
      var_BC = per_group(jnp.sum(jnp.square(x32 - expand(mean_BC)), axis=pixels))
    mul_BC = jax.lax.rsqrt(var_BC + self.epsilon) * scale
    return ((x32 - expand(mean_BC)) * expand(mul_BC) + bias).astype(self.dtype)


PIXEL_SUMS = ('auto', 'xla', 'pallas')


def pixel_sums(x_BHWC, rows: int, implementation: str = 'auto'):
  """(sum, sum of squares) in fp32 over the pixels, per (image, channel): (B, C) each.

  'xla': `_pixel_sums` over rows of `rows` pixels; 'pallas': `kernels.pixel_sums` where it
  takes the shape, else XLA; 'auto': pallas on GPU.
  """
  if implementation not in PIXEL_SUMS:
    raise ValueError(f'GroupNorm sums must be one of {PIXEL_SUMS}, got {implementation!r}')
  if implementation == 'auto':
    implementation = 'pallas' if jax.default_backend() == 'gpu' else 'xla'
  if implementation == 'pallas' and pixel_sums_kernel.block_rows(x_BHWC.shape):
    return pixel_sums_kernel.pixel_sums_pallas(x_BHWC)
  return _pixel_sums(x_BHWC.astype(jnp.float32), rows)


def _pixel_sums(x_BHWC, rows: int):
  """(sum, sum of squares) over the pixels, per (image, channel): (B, C) each. Summed over
  (B, pixels / rows, rows * C) first when `rows` divides the pixels, then over the rows."""
  b, c = x_BHWC.shape[0], x_BHWC.shape[-1]
  p = x_BHWC.size // (b * c)
  r = rows if p % rows == 0 else 1
  wide = x_BHWC.reshape(b, p // r, r * c)
  total = lambda v: v.sum(axis=1).reshape(b, r, c).sum(axis=1)
  return total(wide), total(jnp.square(wide))


def _norm(cfg: VQVAEConfig, name: str, dtype: Any = jnp.float32) -> GroupNorm:
  # Statistics are fp32 whatever `dtype` (the output's) is; one pass for 16-bit activations.
  return GroupNorm(cfg.norm_groups, 1e-6, dtype, single_pass=jnp.dtype(dtype).itemsize < 4,
                   name=name)


def _silu(x):
  """x * sigmoid(x), torch's SiLU (a module-level hook: launch/bench_fusions.py times other
  forms of it in the decoder)."""
  return nn.silu(x)


class ResnetBlock(nn.Module):
  """GN, SiLU, conv3, GN, SiLU, conv3; 1x1 `nin_shortcut` when the width changes."""

  config: VQVAEConfig
  features: int
  dtype: Any = jnp.float32  # activations

  @nn.compact
  def __call__(self, x_BHWC):
    cfg, dt = self.config, self.dtype
    h = _conv(cfg, self.features, 3, 'conv1', dtype=dt)(_silu(_norm(cfg, 'norm1', dt)(x_BHWC)))
    h = _conv(cfg, self.features, 3, 'conv2', dtype=dt)(_silu(_norm(cfg, 'norm2', dt)(h)))
    if x_BHWC.shape[-1] != self.features:
      x_BHWC = _conv(cfg, self.features, 1, 'nin_shortcut', dtype=dt)(x_BHWC)
    return x_BHWC.astype(dt) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all pixels, residual."""

  config: VQVAEConfig
  dtype: Any = jnp.float32  # activations (the softmax is fp32)

  @nn.compact
  def __call__(self, x_BHWC):
    cfg, dt = self.config, self.dtype
    b, h, w, c = x_BHWC.shape
    prec = PRECISIONS[cfg.precision]
    qkv = _conv(cfg, 3 * c, 1, 'qkv', dtype=dt)(_norm(cfg, 'norm', dt)(x_BHWC))
    qkv = qkv.reshape(b, h * w, 3 * c)
    # torch views the 3C channels as (3, C): q, k, v are contiguous thirds.
    q_BLC, k_BLC, v_BLC = jnp.split(qkv, 3, axis=-1)
    w_BLL = jnp.einsum('bic,bjc->bij', q_BLC, k_BLC, precision=prec,
                       preferred_element_type=jnp.float32) * c ** -0.5
    p_BLL = jax.nn.softmax(w_BLL, axis=-1).astype(dt)
    o_BLC = jnp.einsum('bij,bjc->bic', p_BLL, v_BLC, precision=prec)
    return x_BHWC.astype(dt) + _conv(cfg, c, 1, 'proj_out', dtype=dt)(o_BLC.reshape(b, h, w, c))


class Downsample(nn.Module):
  """Pad right/bottom by one, 3x3 stride-2 VALID conv (the official asymmetric padding)."""

  config: VQVAEConfig

  @nn.compact
  def __call__(self, x_BHWC):
    x = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.config, x.shape[-1], 3, 'conv', stride=2, padding='VALID')(x)


# Nearest x2 then a 3x3 'SAME' conv, per output phase: output row 2i+a sees input rows
# (i-1, i) with taps (k0, k1+k2) for a = 0 and rows (i, i+1) with taps (k0+k1, k2) for a = 1
# (the padding row is zero either way); columns alike.
def _phase_taps(k, axis):
  """[a][u]: phase a's tap u, the 3x3 kernel's taps along `axis` summed as above."""
  k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
  return [[k0, k1 + k2], [k0 + k1, k2]]


def phase_kernels(kernel_33IO):
  """(3, 3, Cin, Cout) -> (2, 2, Cin, 4 * Cout): phase (a, b)'s 2x2 kernel in output channels
  [(a * 2 + b) * Cout, ...). Sums of taps in the kernel's dtype: elementwise adds, not a
  contraction (as an einsum it was a (Cin * Cout * 9, 4) GEMM per decode chunk on the GPU)."""
  stack = lambda taps: jnp.stack([jnp.stack(t) for t in taps])
  rows_au3IO = stack(_phase_taps(kernel_33IO, 0))
  k_bvauIO = stack(_phase_taps(rows_au3IO, 2))  # the columns' taps of every row tap
  cin, cout = kernel_33IO.shape[2:]
  return jnp.transpose(k_bvauIO, (3, 1, 4, 2, 0, 5)).reshape(2, 2, cin, 4 * cout)


class UpsampleConv(nn.Module):
  """Nearest x2 then 3x3 conv (params as nn.Conv's), without building the x2 input.

  The four output phases are one 2x2 VALID conv with 4x the outputs on the input padded by
  one: 16 instead of 36 multiply-adds per input pixel and channel pair (2.25x fewer), and no
  4x-sized upsampled copy. Equal to the direct form up to fp32 rounding of the summed taps.
  """

  features: int
  precision: Any
  dtype: Any = jnp.float32  # activations; the summed phase taps are formed in fp32

  @nn.compact
  def __call__(self, x_BHWC):
    b, h, w, cin = x_BHWC.shape
    x_BHWC = x_BHWC.astype(self.dtype)
    kernel = self.param('kernel', CONV_KERNEL_INIT, (3, 3, cin, self.features))
    bias = self.param('bias', CONV_BIAS_INIT, (self.features,))
    # (2, 2, Cin, [a, b, Cout]): phase (a, b)'s 2x2 kernel in the output channels.
    k_phases = phase_kernels(kernel.astype(jnp.float32)).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0))), k_phases, (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    y = y.reshape(b, h + 1, w + 1, 2, 2, self.features)  # (B, H+1, W+1, a, b, C)
    return _phases_to_image(y, bias.astype(self.dtype))


def _interleave_phases(y_BhwabC):
  """(B, H+1, W+1, 2, 2, C) phase outputs -> (B, 2H, 2W, C): output (2i + a, 2j + b) is
  y[i + a, j + b, a, b]."""
  b, h, w, c = y_BhwabC.shape[0], y_BhwabC.shape[1] - 1, y_BhwabC.shape[2] - 1, y_BhwabC.shape[-1]
  rows = jnp.stack([y_BhwabC[:, a:a + h, :, a] for a in range(2)], axis=2)  # (B, H, 2, W+1, 2, C)
  out = jnp.stack([rows[:, :, :, bb:bb + w, bb] for bb in range(2)], axis=4)  # (B, H, 2, W, 2, C)
  return out.reshape(b, 2 * h, 2 * w, c)


def _phases_to_image(y_BhwabC, bias_C):
  """The upsampling conv's image from its phase outputs, plus the bias (a module-level hook:
  launch/bench_fusions.py times other forms)."""
  return _interleave_phases(y_BhwabC) + bias_C


class Upsample(nn.Module):
  """Nearest x2 then 3x3 conv."""

  config: VQVAEConfig
  dtype: Any = jnp.float32  # activations

  @nn.compact
  def __call__(self, x_BHWC):
    return UpsampleConv(x_BHWC.shape[-1], PRECISIONS[self.config.precision], self.dtype,
                        name='conv')(x_BHWC)


class Level(nn.Module):
  """One resolution level: res blocks (each followed by attention if `attn`), then resample."""

  config: VQVAEConfig
  features: int
  num_blocks: int
  attn: bool
  resample: str | None  # 'down' | 'up' | None
  dtype: Any = jnp.float32  # activations

  @nn.compact
  def __call__(self, x_BHWC):
    for j in range(self.num_blocks):
      x_BHWC = ResnetBlock(self.config, self.features, self.dtype, name=f'block_{j}')(x_BHWC)
      if self.attn:
        x_BHWC = AttnBlock(self.config, self.dtype, name=f'attn_{j}')(x_BHWC)
    if self.resample == 'down':
      x_BHWC = Downsample(self.config, name='downsample')(x_BHWC)
    elif self.resample == 'up':
      x_BHWC = Upsample(self.config, self.dtype, name='upsample')(x_BHWC)
    return x_BHWC


class Mid(nn.Module):
  """block_1, attn_1 (optional), block_2 at the lowest resolution."""

  config: VQVAEConfig
  dtype: Any = jnp.float32  # activations

  @nn.compact
  def __call__(self, x_BHWC):
    cfg, dt = self.config, self.dtype
    c = x_BHWC.shape[-1]
    x_BHWC = ResnetBlock(cfg, c, dt, name='block_1')(x_BHWC)
    if cfg.using_mid_sa:
      x_BHWC = AttnBlock(cfg, dt, name='attn_1')(x_BHWC)
    return ResnetBlock(cfg, c, dt, name='block_2')(x_BHWC)


class Encoder(nn.Module):
  """(B, H, W, in_channels) -> (B, H/d, W/d, z_channels), d = 2**(len(ch_mult)-1)."""

  config: VQVAEConfig

  @nn.compact
  def __call__(self, img_BHWC):
    cfg = self.config
    n = len(cfg.ch_mult)
    x = _conv(cfg, cfg.ch, 3, 'conv_in')(img_BHWC)
    for i, width in enumerate(cfg.widths):
      last = i == n - 1
      x = Level(cfg, width, cfg.num_res_blocks, attn=last and cfg.using_sa,
                resample=None if last else 'down', name=f'down_{i}')(x)
    x = Mid(cfg, name='mid')(x)
    return _conv(cfg, cfg.z_channels, 3, 'conv_out')(nn.silu(_norm(cfg, 'norm_out')(x)))


class Decoder(nn.Module):
  """(B, h, w, z_channels) -> (B, h*d, w*d, in_channels), unclamped.

  The decoder is a sequence of `num_decoder_stages(config)` stages: 0 is conv_in and mid,
  1..n the up levels from the lowest resolution (up_{n-1}) to up_0, n+1 is norm_out and
  conv_out. `begin`/`end` run stages begin..end-1 only (the input of stage `begin` is the
  output of stage begin-1), so a batch can go through the small maps whole and through
  the large ones in chunks (`sampling.decode_in_chunks`).
  """

  config: VQVAEConfig

  @nn.compact
  def __call__(self, x_BhwC, *, begin: int = 0, end: int | None = None):
    cfg = self.config
    dt = jnp.dtype(cfg.decoder_dtype)
    n = len(cfg.ch_mult)
    end = n + 2 if end is None else end
    if not 0 <= begin < end <= n + 2:
      raise ValueError(f'decoder stages must satisfy 0 <= begin < end <= {n + 2}, '
                       f'got {begin}..{end}')
    if begin <= 0 < end:
      x_BhwC = _conv(cfg, cfg.widths[-1], 3, 'conv_in', dtype=dt)(x_BhwC)
      x_BhwC = Mid(cfg, dt, name='mid')(x_BhwC)
    # Named as upstream: up_{n-1} (lowest resolution) runs first, up_0 last.
    for stage, i in enumerate(reversed(range(n)), start=1):
      if begin <= stage < end:
        x_BhwC = Level(cfg, cfg.widths[i], cfg.num_res_blocks + 1,
                       attn=i == n - 1 and cfg.using_sa, resample='up' if i else None,
                       dtype=dt, name=f'up_{i}')(x_BhwC)
    if end < n + 2:
      return x_BhwC
    return _conv_out(cfg, dt)(_silu(_norm(cfg, 'norm_out', dt)(x_BhwC)))


def _conv_out(cfg: VQVAEConfig, dtype) -> Callable[[jax.Array], jax.Array]:
  """The decoder's last conv (to in_channels), returning fp32; `TapSumConv` for 16-bit
  activations (the GPU's decode), a conv as upstream's for fp32."""
  if jnp.dtype(dtype).itemsize < 4:
    return TapSumConv(cfg.in_channels, PRECISIONS[cfg.precision], dtype, name='conv_out')
  conv = _conv(cfg, cfg.in_channels, 3, 'conv_out', dtype=dtype)
  return lambda x: conv(x).astype(jnp.float32)


def num_decoder_stages(config: VQVAEConfig) -> int:
  """Stages of `Decoder`: conv_in + mid, one per up level, norm_out + conv_out."""
  return len(config.ch_mult) + 2


def decoder_stage_sides(config: VQVAEConfig) -> tuple[int, ...]:
  """Side in pixels of each decoder stage's output (the last one is the image's)."""
  side = config.resolution // config.downsample
  sides = [side]
  for i in reversed(range(len(config.ch_mult))):
    side *= 2 if i else 1
    sides.append(side)
  return tuple(sides) + (side,)


class TapSumConv(nn.Module):
  """3x3 SAME conv (params as nn.Conv's) for few output channels: one matmul to every tap's
  contribution, (B, H, W, Cin) @ (Cin, 9 * Cout) accumulated in fp32, then the nine maps
  shifted and summed in fp32; returns fp32.

  The decoder's conv_out (160 -> 3 channels at full resolution) as a convolution ran at ~20
  TFLOP/s on an H100 in bf16: 225 us per 8 images at 256 px, plus ~25 us of cuDNN's channel
  padding kernels (launch/results/h100_2026-11-26.md): tiles sized for many output channels
  compute ~20x the useful work. The matmul here reads the input once and writes 9 * Cout
  (padded to 16) fp32 values per pixel. Equal to the conv up to rounding: the taps' sums are
  fp32, not the conv's bf16 output.
  """

  features: int
  precision: Any
  dtype: Any = jnp.float32  # the matmul's operands

  @nn.compact
  def __call__(self, x_BHWC):
    b, h, w, cin = x_BHWC.shape
    kernel = self.param('kernel', CONV_KERNEL_INIT, (3, 3, cin, self.features))
    bias = self.param('bias', CONV_BIAS_INIT, (self.features,))
    taps = 9 * self.features
    k_IT = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin, taps).astype(self.dtype)
    k_IT = jnp.pad(k_IT, ((0, 0), (0, -taps % 16)))  # an aligned GEMM width
    t = jnp.dot(x_BHWC.astype(self.dtype), k_IT, precision=self.precision,
                preferred_element_type=jnp.float32)[..., :taps]
    t = jnp.pad(t.reshape(b, h, w, 3, 3, self.features), ((0, 0), (1, 1), (1, 1)) + ((0, 0),) * 3)
    # Output (y, x) takes tap (i, j) of input pixel (y + i - 1, x + j - 1).
    out = sum(t[:, i:i + h, j:j + w, i, j] for i in range(3) for j in range(3))
    return out + bias.astype(jnp.float32)


class PhiBank(nn.Module):
  """The shared Phi convs: `qresi_ls_{i}` (or one `qresi` when num_phi == 1), as upstream."""

  config: VQVAEConfig

  def setup(self):
    cfg = self.config
    if cfg.num_phi == 1:
      self.qresi = _conv(cfg, cfg.z_channels, 3, None)
    else:
      self.qresi_ls = [_conv(cfg, cfg.z_channels, 3, None) for _ in range(cfg.num_phi)]

  def __call__(self, si: int, h_BhwC):
    """Phi of scale si: (1 - r) h + r conv(h), same shape."""
    cfg = self.config
    if cfg.num_phi == 1:
      conv = self.qresi
    else:
      conv = self.qresi_ls[phi_index(si, len(cfg.patch_nums), cfg.num_phi)]
    r = cfg.phi_ratio
    return h_BhwC * (1 - r) + conv(h_BhwC) * r

  def touch_all(self, h_BhwC):
    """Runs every conv once, so init creates them all (few scales may not reach each Phi)."""
    convs = [self.qresi] if self.config.num_phi == 1 else self.qresi_ls
    for conv in convs:
      conv(h_BhwC)


def _codebook_init(eini: float, vocab_size: int):
  """VAR's `eini`: <0 uniform(+-|eini|/V), >0 trunc-normal (bounds +-2 absolute), 0 N(0, 1)."""
  if eini < 0:
    bound = abs(eini) / vocab_size
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
  if eini > 0:
    return lambda key, shape, dtype=jnp.float32: (
        jax.random.truncated_normal(key, -2.0 / eini, 2.0 / eini, shape, dtype) * eini)
  return nn.initializers.normal(1.0)


class MultiScaleQuantizer(nn.Module):
  """Residual quantisation over the scales of `config.patch_nums` (VAR's VectorQuantizer2).

  Feature maps are (B, pn_K, pn_K, Cvae) with pn_K = patch_nums[-1]; everything is fp32.
  """

  config: VQVAEConfig

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.z_channels, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(_codebook_init(cfg.eini, cfg.vocab_size),
                                                    ('vae_vocab', 'vae_code')))
    self.quant_resi = PhiBank(cfg)

  def codebook(self):
    """(V, Cvae) code vectors."""
    return self.embedding.embedding

  def embed_ids(self, ids_BL):
    """(B, L) int -> (B, L, Cvae)."""
    return jnp.take(self.codebook(), ids_BL, axis=0)

  def _code_map(self, si: int, ids_BL):
    pn = self.config.patch_nums[si]
    if ids_BL.shape[1:] != (pn * pn,):
      raise ValueError(f'ids of scale {si} must be (B, {pn * pn}), got {ids_BL.shape}')
    return self.embed_ids(ids_BL).reshape(ids_BL.shape[0], pn, pn, -1)

  def upsample_phi(self, si: int, h_BhwC):
    """Phi_si(bicubic h to pn_K x pn_K); the last scale is already that size."""
    last = self.config.patch_nums[-1]
    if si != len(self.config.patch_nums) - 1:
      h_BhwC = resize_bicubic(h_BhwC, (last, last))
    return self.quant_resi(si, h_BhwC)

  def nearest(self, z_BhwC):
    """(B, h, w, Cvae) -> (B, h*w) int32 ids of the nearest code vectors (Euclidean)."""
    b, h, w, c = z_BhwC.shape
    z_NC = jax.lax.stop_gradient(z_BhwC).reshape(-1, c)
    e_VC = jax.lax.stop_gradient(self.codebook())
    # Same expansion as upstream (|z|^2 + |e|^2 - 2 z.e); HIGHEST keeps near-ties as in fp32.
    d_NV = (jnp.sum(z_NC * z_NC, axis=1, keepdims=True) + jnp.sum(e_VC * e_VC, axis=1)
            - 2.0 * jnp.matmul(z_NC, e_VC.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d_NV, axis=1).astype(jnp.int32).reshape(b, h * w)

  def quantize(self, f_BhwC):
    """Residual quantisation of sg(f): (ids per scale, f_hat after each scale).

    The f_hats carry gradients into the codebook and the Phi convs (the VQ loss needs them);
    the residual that picks the ids does not.
    """
    cfg = self.config
    k = len(cfg.patch_nums)
    last = cfg.patch_nums[-1]
    if f_BhwC.shape[1:3] != (last, last):
      raise ValueError(f'features must be (B, {last}, {last}, C) for patch_nums[-1]={last}, '
                       f'got {f_BhwC.shape}')
    f_rest = jax.lax.stop_gradient(f_BhwC).astype(jnp.float32)
    f_hat = jnp.zeros_like(f_rest)
    ids, f_hats = [], []
    for si, pn in enumerate(cfg.patch_nums):
      z = f_rest if si == k - 1 else resize_area(f_rest, (pn, pn))
      ids_BL = self.nearest(z)
      h = self.upsample_phi(si, self._code_map(si, ids_BL))
      f_hat = f_hat + h
      f_rest = f_rest - jax.lax.stop_gradient(h)
      ids.append(ids_BL)
      f_hats.append(f_hat)
    return ids, f_hats

  def ids_to_fhat(self, ids: Sequence[jax.Array]):
    """K arrays (B, pn*pn) -> f_hat (B, pn_K, pn_K, Cvae) fp32."""
    self._check_ids(ids)
    f_hat = 0.0
    for si, ids_BL in enumerate(ids):
      f_hat = f_hat + self.upsample_phi(si, self._code_map(si, ids_BL))
    return f_hat

  def ids_to_teacher_input(self, ids: Sequence[jax.Array]):
    """K arrays (B, pn*pn) -> (B, L - pn_0**2, Cvae) fp32: area-resized running f_hat per scale."""
    self._check_ids(ids)
    pns = self.config.patch_nums
    b = ids[0].shape[0]
    f_hat, parts = 0.0, []
    for si in range(len(pns) - 1):  # the last scale's codes feed no later input
      f_hat = f_hat + self.upsample_phi(si, self._code_map(si, ids[si]))
      nxt = pns[si + 1]
      parts.append(resize_area(f_hat, (nxt, nxt)).reshape(b, nxt * nxt, -1))
    if not parts:
      return jnp.zeros((b, 0, self.config.z_channels), jnp.float32)
    return jnp.concatenate(parts, axis=1)

  def next_autoregressive_input(self, si: int, f_hat_BhwC, h_BhwC):
    """Adds scale si's code map (B, pn, pn, C) or (B, pn*pn, C) to f_hat; returns (f_hat, next).

    `next` is f_hat area-resized to pn_{si+1} (the next scale's input), or f_hat itself
    after the last scale. f_hat None means zeros.
    """
    cfg = self.config
    k, pn, last = len(cfg.patch_nums), cfg.patch_nums[si], cfg.patch_nums[-1]
    b = h_BhwC.shape[0]
    h_BhwC = h_BhwC.reshape(b, pn, pn, -1).astype(jnp.float32)
    if f_hat_BhwC is None:
      f_hat_BhwC = jnp.zeros((b, last, last, h_BhwC.shape[-1]), jnp.float32)
    f_hat_BhwC = f_hat_BhwC + self.upsample_phi(si, h_BhwC)
    if si == k - 1:
      return f_hat_BhwC, f_hat_BhwC
    nxt = cfg.patch_nums[si + 1]
    return f_hat_BhwC, resize_area(f_hat_BhwC, (nxt, nxt))

  def __call__(self, f_BhwC):
    """Training forward: (straight-through f_hat, vq_loss, hits_SV int32 code hit counts)."""
    cfg = self.config
    if self.is_initializing():
      self.quant_resi.touch_all(jnp.zeros_like(f_BhwC, jnp.float32))
    f = f_BhwC.astype(jnp.float32)
    f_sg = jax.lax.stop_gradient(f)
    ids, f_hats = self.quantize(f)
    sg = jax.lax.stop_gradient
    # Commitment pulls f towards the codes; the codebook term pulls the codes (via Phi) to f.
    losses = [cfg.beta * jnp.mean(jnp.square(sg(fh) - f)) + jnp.mean(jnp.square(fh - f_sg))
              for fh in f_hats]
    vq_loss = sum(losses) / len(losses)
    f_st = (sg(f_hats[-1]) - f_sg) + f  # straight-through: value f_hat, gradient to f
    hits_SV = jnp.stack([jnp.zeros((cfg.vocab_size,), jnp.int32).at[i.reshape(-1)].add(1)
                         for i in ids])
    return f_st, vq_loss, hits_SV

  def _check_ids(self, ids):
    k = len(self.config.patch_nums)
    if len(ids) != k:
      raise ValueError(f'expected ids for {k} scales (patch_nums={self.config.patch_nums}), '
                       f'got {len(ids)}')


# ----------------------------------------------------------------------------- model

class VQVAE(nn.Module):
  """Encoder, multi-scale quantizer and decoder. Call the methods with `apply(..., method=)`."""

  config: VQVAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quantize = MultiScaleQuantizer(cfg)
    self.quant_conv = _conv(cfg, cfg.z_channels, 3, None)
    self.post_quant_conv = _conv(cfg, cfg.z_channels, 3, None,
                                 dtype=jnp.dtype(cfg.decoder_dtype))

  def encode(self, img_BHWC):
    """Images in [-1, 1] (B, H, W, in_channels) -> f (B, pn_K, pn_K, Cvae)."""
    cfg = self.config
    s = cfg.resolution
    if img_BHWC.ndim != 4 or img_BHWC.shape[1:] != (s, s, cfg.in_channels):
      raise ValueError(f'images must be (B, {s}, {s}, {cfg.in_channels}), got {img_BHWC.shape}')
    return self.quant_conv(self.encoder(img_BHWC))

  def decode(self, f_hat_BhwC):
    """f_hat (B, pn_K, pn_K, Cvae) -> images (B, H, W, in_channels), unclamped."""
    return self.decoder(self.post_quant_conv(f_hat_BhwC))

  def decode_stages(self, x, begin: int, end: int | None = None):
    """Decoder stages begin..end-1 (see `Decoder`); stage 0 starts from f_hat (through
    post_quant_conv), the last one ends in unclamped images."""
    if begin == 0:
      x = self.post_quant_conv(x)
    return self.decoder(x, begin=begin, end=end)

  def img_to_ids(self, img_BHWC, return_fhat: bool = False):
    """K arrays (B, pn*pn) int32 (raster order); with return_fhat also f_hat (B, pn_K, pn_K, C)."""
    ids, f_hats = self.quantize.quantize(self.encode(img_BHWC))
    return (ids, f_hats[-1]) if return_fhat else ids

  def ids_to_fhat(self, ids):
    return self.quantize.ids_to_fhat(ids)

  def fhat_to_img(self, f_hat_BhwC):
    """f_hat -> images clamped to [-1, 1]."""
    return jnp.clip(self.decode(f_hat_BhwC), -1.0, 1.0)

  def ids_to_img(self, ids):
    return self.fhat_to_img(self.ids_to_fhat(ids))

  def ids_to_teacher_input(self, ids):
    return self.quantize.ids_to_teacher_input(ids)

  def next_autoregressive_input(self, si: int, f_hat_BhwC, h_BhwC):
    return self.quantize.next_autoregressive_input(si, f_hat_BhwC, h_BhwC)

  def embed_ids(self, ids_BL):
    return self.quantize.embed_ids(ids_BL)

  def codebook(self):
    return self.quantize.codebook()

  def __call__(self, img_BHWC):
    """VAE training forward: (reconstruction (B, H, W, C) unclamped, vq_loss, hits_SV (K, V))."""
    f_st, vq_loss, hits_SV = self.quantize(self.encode(img_BHWC))
    return self.decode(f_st), vq_loss, hits_SV


# ----------------------------------------------------------------------------- functions

_jit_self = functools.partial(jax.jit, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Params-first, jitted view of `VQVAE(config)`: tok.img_to_ids(params, img) etc.

  Hashable (the config is the only field), so it is also a valid static argument of an
  enclosing jit; calling these methods inside one simply inlines them.
  """

  config: VQVAEConfig

  @property
  def module(self) -> VQVAE:
    return VQVAE(self.config)

  def _apply(self, params, method, *args, **kwargs):
    variables = params if 'params' in params else {'params': params}
    return self.module.apply(variables, *args, method=method, **kwargs)

  def cast_for_decode(self, params):
    """params with the decode path's conv kernels and biases in `decoder_dtype`.

    For a loop of decodes (the sampler's chunks): the bf16 convs would otherwise cast their
    fp32 kernels on every call (on an H200, ~400 small kernels and ~1 ms per d16 sampler
    call). GroupNorm params stay fp32; fp32 decoders get params back unchanged.
    """
    dt = jnp.dtype(self.config.decoder_dtype)
    if dt == jnp.float32:
      return params

    def cast(node):  # a conv is a dict holding a 'kernel'; GroupNorms hold scale and bias
      if 'kernel' in node:
        return {k: v.astype(dt) if k in ('kernel', 'bias') else v for k, v in node.items()}
      return {k: cast(v) if isinstance(v, Mapping) else v for k, v in node.items()}

    wrapped = 'params' in params
    tree = dict(params['params'] if wrapped else params)
    for name in ('decoder', 'post_quant_conv'):
      tree[name] = cast(tree[name])
    return {**params, 'params': tree} if wrapped else tree

  @_jit_self
  def encode(self, params, img_BHWC):
    return self._apply(params, VQVAE.encode, img_BHWC)

  @_jit_self
  def decode(self, params, f_hat_BhwC):
    return self._apply(params, VQVAE.decode, f_hat_BhwC)

  @functools.partial(jax.jit, static_argnums=0, static_argnames='return_fhat')
  def img_to_ids(self, params, img_BHWC, return_fhat: bool = False):
    return self._apply(params, VQVAE.img_to_ids, img_BHWC, return_fhat=return_fhat)

  @_jit_self
  def ids_to_fhat(self, params, ids):
    return self._apply(params, VQVAE.ids_to_fhat, ids)

  @functools.partial(jax.jit, static_argnums=(0, 3, 4))
  def decode_stages(self, params, x, begin: int, end: int | None = None):
    return self._apply(params, VQVAE.decode_stages, x, begin, end)

  @_jit_self
  def fhat_to_img(self, params, f_hat_BhwC):
    return self._apply(params, VQVAE.fhat_to_img, f_hat_BhwC)

  @_jit_self
  def ids_to_img(self, params, ids):
    return self._apply(params, VQVAE.ids_to_img, ids)

  @_jit_self
  def ids_to_teacher_input(self, params, ids):
    return self._apply(params, VQVAE.ids_to_teacher_input, ids)

  @functools.partial(jax.jit, static_argnums=(0, 2))
  def next_autoregressive_input(self, params, si: int, f_hat_BhwC, h_BhwC):
    return self._apply(params, VQVAE.next_autoregressive_input, si, f_hat_BhwC, h_BhwC)

  next_input = next_autoregressive_input  # the sampler's short name

  @_jit_self
  def embed_ids(self, params, ids_BL):
    return self._apply(params, VQVAE.embed_ids, ids_BL)

  @_jit_self
  def codebook(self, params):
    return self._apply(params, VQVAE.codebook)

  @_jit_self
  def __call__(self, params, img_BHWC):
    return self._apply(params, VQVAE.__call__, img_BHWC)


# jit: eager flax init dispatches op by op (tens of seconds on CPU for a tiny model). One
# jitted function for every config: a jit of a bound method made per call compiled again on
# every call (~3 s each for a test-size tokenizer).
@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: VQVAEConfig, rng, batch_size: int = 1):
  """Freshly initialised variables {'params': ...} (boxed with logical axis names)."""
  s = config.resolution
  img = jnp.zeros((batch_size, s, s, config.in_channels), jnp.float32)
  return VQVAE(config).init({'params': rng}, img)


def random_params(config: VQVAEConfig, seed: int = 0):
  """Random params drawn on the host (nothing compiled), for tests and benchmarks.

  On the abstract tree of `init_params`: kernels U(+-1/sqrt(fan_in)), codes N(0, 1), norm
  scales 1 + 0.1 N, biases 0.1 N, so every tensor matters.
  """
  abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))['params']
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      bound = 1 / np.sqrt(np.prod(shape[:-1]))
      x = rng.uniform(-bound, bound, shape)
    elif name == 'embedding':
      x = rng.standard_normal(shape)
    else:
      x = (name == 'scale') + 0.1 * rng.standard_normal(shape)
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


def count_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nn.unbox(params)))
