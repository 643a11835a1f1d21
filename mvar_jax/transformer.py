"""The VAR / MVAR transformer (identical parameters; MVAR only changes attention).

    model = MVARTransformer(preset(16))
    logits_BLV = model.apply(params, label_B, teacher_BlCv, first=0, last=9)

A call computes the logits of the tokens of scales `first..last`:
- first == 0: the sequence starts with the class token (class_emb + pos_start) and
  `x_BlCv` holds the teacher inputs of the other tokens (L_seg - 1 of them; None
  when only scale 0 is asked for);
- first > 0: `x_BlCv` holds the inputs of all L_seg tokens.

Per-scale forward passes. Under scale-Markov conditioning a scale's logits depend
only on its own input, so any subset of scales can be computed in one call or
scale by scale with identical results (tests/test_transformer.py checks this). We do
not `vmap` over scales: scales have different lengths (1..256 tokens), so a vmap
would pad every scale to 256 tokens (10x the tokens of the 8 small scales). All
token-wise layers (linears, norms, MLP) instead run over the concatenated scales,
which is what a vmap over scales would compute, without the padding; only the
attention differs per scale, and `attention.multiscale_attention` splits it
(block-diagonal dense for the small scales, one neighbourhood op per large map).
Training can therefore run all scales in one call, or the official segment
schedule (scales 0..refine_step-1 together, then each large scale alone), with
the same function.

Parameter names follow the official state dict (`blocks_3/attn/mat_qkv` for
`blocks.3.attn.mat_qkv`), so the converter is a naming rule plus transposes. Every
parameter carries logical axis names for sharding rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax import attention, weight_grads
from mvar_jax.attention import AttentionConfig, multiscale_attention
from mvar_jax.kernels import dense_gelu
from mvar_jax.layout import DEFAULT_PATCH_NUMS, ScaleLayout

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
FFN_IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
BACKWARD_SETTINGS = ('auto', 'on', 'off')  # grad_boundaries, transposed_weight_grads


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture and regularisation of the transformer (frozen: a jit static arg)."""

  depth: int = 16  # number of AdaLN blocks
  width: int = 1024  # C: token width (64 * depth for the official presets)
  num_heads: int = 16  # attention heads (head dim = width / num_heads)
  mlp_ratio: float = 4.0  # FFN hidden width / C
  num_classes: int = 1000  # class ids 0..num_classes-1; num_classes is the null class (CFG)
  vocab_size: int = 4096  # V: tokenizer codebook size
  cvae: int = 32  # tokenizer code width (teacher input channels)
  patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS  # side of each scale's token map
  attention: AttentionConfig = AttentionConfig()  # scale/spatial-Markov pattern
  drop_path_rate: float = 0.0  # max stochastic-depth rate (linearly increasing per block)
  cond_drop_rate: float = 0.1  # class dropout for CFG training
  norm_eps: float = 1e-6  # LayerNorm epsilon
  dtype: str = 'float32'  # compute dtype of the blocks ('float32' | 'bfloat16' | 'float16')
  ffn_implementation: str = 'auto'  # fc1 + GELU in inference: 'auto' (= 'xla') | 'xla' | 'pallas'
  remat: bool = False  # rematerialise each block in the backward pass (saves memory)
  grad_boundaries: str = 'auto'  # training backward: 'auto' | 'on' | 'off' (`grad_boundary`)
  # Training backward: the dense layers' weight gradients as ordinary GEMMs on a transposed
  # copy of the input, 'auto' | 'on' | 'off' ('auto': on for CPU; `weight_grads`).
  transposed_weight_grads: str = 'auto'
  init_adaln: float = 0.5  # multiplier of the AdaLN scale/shift rows at init
  init_adaln_gamma: float = 1e-5  # multiplier of the AdaLN gamma rows at init
  init_head: float = 0.02  # multiplier of the head weight at init

  def __post_init__(self):
    # A list (JSON, a user's literal) would make the config unhashable, and it is a jit
    # static argument (`init_params`, the sampler's cache).
    object.__setattr__(self, 'patch_nums', tuple(int(p) for p in self.patch_nums))

  @property
  def layout(self) -> ScaleLayout:
    return ScaleLayout(self.patch_nums)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def validate(self) -> 'TransformerConfig':
    """Raises ValueError naming the field; returns self for chaining."""
    for name in ('depth', 'width', 'num_heads', 'num_classes', 'vocab_size', 'cvae'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} must be divisible by num_heads {self.num_heads}')
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}')
    if self.ffn_implementation not in FFN_IMPLEMENTATIONS:
      raise ValueError(f'ffn_implementation must be one of {FFN_IMPLEMENTATIONS}, '
                       f'got {self.ffn_implementation!r}')
    for name in ('grad_boundaries', 'transposed_weight_grads'):
      if getattr(self, name) not in BACKWARD_SETTINGS:
        raise ValueError(f'{name} must be one of {BACKWARD_SETTINGS}, '
                         f'got {getattr(self, name)!r}')
    for name in ('drop_path_rate', 'cond_drop_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got {getattr(self, name)}')
    self.attention.validate(self.layout)
    return self


def preset(depth: int, **overrides: Any) -> TransformerConfig:
  """Official VAR/MVAR-d{depth}: width 64*d, d heads, drop path 0.1*d/24."""
  kwargs = dict(depth=depth, width=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24)
  kwargs.update(overrides)
  return TransformerConfig(**kwargs).validate()


# ----------------------------------------------------------------------------- init

def trunc_normal(std: float, multiplier: float = 1.0):
  """torch.nn.init.trunc_normal_(std=std) (bounds are absolute +-2), times `multiplier`."""

  def init(key, shape, dtype=jnp.float32):
    x = jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32) * std
    return (x * multiplier).astype(dtype)

  return init


def adaln_init(std: float, num_chunks: int, chunk_multipliers: tuple[float, ...]):
  """Kernel (D, num_chunks*C) init whose output chunks are scaled separately."""

  def init(key, shape, dtype=jnp.float32):
    w = trunc_normal(std)(key, shape, jnp.float32)
    c = shape[-1] // num_chunks
    mult = np.repeat(np.asarray(chunk_multipliers, np.float32), c)
    return (w * mult).astype(dtype)

  return init


def _dense(features, names, kernel_init, dtype, use_bias=True, name=None,
           dot_general=jax.lax.dot_general):
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
      dot_general=dot_general)


def _dot_general(cfg: 'TransformerConfig', deterministic: bool):
  """The dense layers' dot: `weight_grads.dense_dot_general` when training with
  transposed_weight_grads on, else `lax.dot_general`."""
  if not deterministic and weight_grads.use_transposed_weight_grads(cfg.transposed_weight_grads):
    return weight_grads.dense_dot_general
  return jax.lax.dot_general


def _layer_norm(x, eps):
  """LayerNorm without affine parameters, statistics in fp32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _l2_normalize(x, eps=1e-12):
  """x / max(||x||, eps) along the last axis, as torch.nn.functional.normalize."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
  return x32 / jnp.maximum(norm, eps)


# ----------------------------------------------------------------------------- layers

class SelfAttention(nn.Module):
  """l2-normalised multi-head attention with a learnable per-head scale (softmax scale 1)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BLC, *, first: int, last: int, deterministic: bool = True):
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    std = math.sqrt(1 / (3 * cfg.width))
    b, l, c = x_BLC.shape
    h, hd = cfg.num_heads, cfg.head_dim
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ('heads',))
    q_bias = self.param('q_bias', zeros, (c,), jnp.float32)
    v_bias = self.param('v_bias', zeros, (c,), jnp.float32)
    scale_mul_1H11 = self.param(
        'scale_mul_1H11',
        nn.with_logical_partitioning(nn.initializers.constant(math.log(4.0)), (None, None, None, None)),
        (1, h, 1, 1), jnp.float32)
    dot = _dot_general(cfg, deterministic)
    qkv = _dense(3 * c, ('embed', 'qkv'), trunc_normal(std), dtype, use_bias=False,
                 name='mat_qkv', dot_general=dot)(x_BLC)
    bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    # Clamped at ln(100) so the attention temperature stays bounded.
    head_scale_H = jnp.exp(jnp.minimum(scale_mul_1H11, math.log(100.0))).reshape(h)
    if attention.uses_fused_qkv(cfg.attention, first, last, hd, dtype,
                                deterministic=deterministic):
      # The kernel adds the bias as it loads q, k, v: no XLA pass over the whole projection.
      o_BLHD = attention.from_qkv(qkv.reshape(b, l, 3, h, hd).astype(dtype), head_scale_H,
                                  layout=cfg.layout, scale_index=first, config=cfg.attention,
                                  bias_3HD=bias.reshape(3, h, hd))
    else:
      qkv = qkv + bias
      q, k, v = jnp.split(qkv.reshape(b, l, 3, h, hd), 3, axis=2)
      q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, L, H, hd)
      q = (_l2_normalize(q) * head_scale_H.reshape(1, 1, h, 1)).astype(dtype)
      k = _l2_normalize(k).astype(dtype)
      o_BLHD = multiscale_attention(q, k, v.astype(dtype), layout=cfg.layout, first=first,
                                    last=last, config=cfg.attention, scale=1.0)
    proj_init = trunc_normal(std, 1 / math.sqrt(2 * cfg.depth))
    return _dense(c, ('qkv', 'embed'), proj_init, dtype, name='proj',
                  dot_general=dot)(o_BLHD.reshape(b, l, c))


def resolve_ffn_implementation(name: str, *, deterministic: bool) -> str:
  """'xla' or 'pallas' for the FFN's fc1 + GELU.

  'pallas' (`kernels.dense_gelu`: the bias and GELU in the matmul's epilogue) has no
  backward: training uses XLA. Under a mesh it runs once per device on its rows.
  'auto' is XLA: on an H100 the kernel saves the GELU passes (4.5 ms per d16 batch-32
  sampler call) but its Triton matmul runs at ~60% of cuBLAS's rate (+6 ms), so the sampler
  took 0.094 s against XLA's 0.092 (launch/results/h100_2026-11-26.md).
  """
  if name in ('xla', 'auto'):
    return 'xla'
  if not deterministic:
    raise ValueError("ffn_implementation='pallas' is inference only (no backward); "
                     "train with 'auto' or 'xla'")
  return 'pallas'


class FFN(nn.Module):
  """fc1 -> GELU (tanh approximation) -> fc2."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BLC, deterministic: bool = True):
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    std = math.sqrt(1 / (3 * cfg.width))
    hidden = round(cfg.width * cfg.mlp_ratio)
    dot = _dot_general(cfg, deterministic)
    fc1 = _dense(hidden, ('embed', 'mlp'), trunc_normal(std), dtype, name='fc1', dot_general=dot)
    impl = resolve_ffn_implementation(cfg.ffn_implementation, deterministic=deterministic)
    b, l, c = x_BLC.shape
    if (impl == 'pallas' and not self.is_initializing()
        and dense_gelu.supports(b * l, c, hidden, x_BLC.dtype)):
      p = nn.unbox(fc1.variables['params'])
      x = dense_gelu.dense_gelu_pallas(x_BLC.astype(dtype).reshape(b * l, c), p['kernel'],
                                       p['bias']).reshape(b, l, hidden)
    else:
      x = nn.gelu(fc1(x_BLC), approximate=True)
    fc2_init = trunc_normal(std, 1 / math.sqrt(2 * cfg.depth))
    return _dense(cfg.width, ('mlp', 'embed'), fc2_init, dtype, name='fc2', dot_general=dot)(x)


def drop_path(x_BLC, rate: float, deterministic: bool, rng_module: nn.Module):
  """Stochastic depth: drops whole samples of a residual branch, rescales the kept ones."""
  if deterministic or rate == 0.0:
    return x_BLC
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng_module.make_rng('dropout'), keep, (x_BLC.shape[0], 1, 1))
  return jnp.where(mask, x_BLC / keep, jnp.zeros_like(x_BLC))


class AdaLNSelfAttn(nn.Module):
  """One block: x += a(LN(x)*(1+s1)+t1)*g1; x += f(LN(x)*(1+s2)+t2)*g2."""

  config: TransformerConfig
  drop_path_rate: float = 0.0

  def setup(self):
    cfg = self.config
    c = cfg.width
    std = math.sqrt(1 / (3 * c))
    # Chunk order of the official ada_lin: gamma1, gamma2, scale1, scale2, shift1, shift2.
    init = adaln_init(std, 6, (cfg.init_adaln_gamma,) * 2 + (cfg.init_adaln,) * 4)
    self.ada_lin = _dense(6 * c, ('embed', 'adaln'), init, DTYPES[cfg.dtype])
    self.attn = SelfAttention(cfg)
    self.ffn = FFN(cfg)

  def modulation(self, cond_BD):
    """The block's AdaLN modulation (B, 6C) of the condition (B, C), in the compute dtype."""
    return self.ada_lin(nn.silu(cond_BD))

  def __call__(self, x_BLC, cond_BD, first: int, last: int, deterministic: bool = True,
               ada_B6C=None):
    """ada_B6C: `modulation(cond_BD)` computed beforehand (a sampler computes it once for all
    scales), or None to compute it here."""
    ada = self.modulation(cond_BD) if ada_B6C is None else ada_B6C
    gamma1, gamma2, scale1, scale2, shift1, shift2 = jnp.split(ada[:, None, :], 6, axis=-1)
    eps = self.config.norm_eps
    # The residual stream stays split over the batch under a mesh (a guard: the condition's
    # constraint in MVARTransformer.__call__ is what fixed a measured case). No-op without one.
    x_BLC = nn.with_logical_constraint(x_BLC, ('activation_batch', None, None))
    h = _layer_norm(x_BLC, eps) * (1 + scale1) + shift1
    h = self.attn(h, first=first, last=last, deterministic=deterministic) * gamma1
    x_BLC = x_BLC + drop_path(h, self.drop_path_rate, deterministic, self)
    h = _layer_norm(x_BLC, eps) * (1 + scale2) + shift2
    h = self.ffn(h, deterministic) * gamma2
    return x_BLC + drop_path(h, self.drop_path_rate, deterministic, self)


class AdaLNBeforeHead(nn.Module):
  """LN(x) * (1 + scale) + shift with (scale, shift) from the condition; fp32."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BLC, cond_BD):
    cfg = self.config
    std = math.sqrt(1 / (3 * cfg.width))
    init = trunc_normal(std, cfg.init_adaln)
    ada = _dense(2 * cfg.width, ('embed', 'adaln'), init, jnp.float32, name='ada_lin')(
        nn.silu(cond_BD))
    scale, shift = jnp.split(ada[:, None, :], 2, axis=-1)
    return _layer_norm(x_BLC, cfg.norm_eps) * (1 + scale) + shift


class LogitsHead(nn.Module):
  """(B, L, C) -> fp32 logits (B, L, V); params 'kernel' (C, V) and 'bias' (V,) as nn.Dense's.

  The matmul runs in the dtype the parameters are stored in, accumulating in fp32: fp32 as
  trained, bf16 after `load_pretrained(param_dtype='bfloat16')` (the official code's head under
  autocast). nn.Dense(dtype=fp32) would up-cast bf16 weights and run an fp32 (TF32) GEMM: 1.1
  ms of a d16 batch-32 sampler call on an H100.
  """

  features: int
  kernel_init: Any

  @nn.compact
  def __call__(self, h_BLC, dot_general=jax.lax.dot_general):
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, ('embed', 'vocab')),
                        (h_BLC.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                      (self.features,), jnp.float32)
    logits = dot_general(h_BLC.astype(kernel.dtype), kernel, (((h_BLC.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return logits + bias.astype(jnp.float32)


# ----------------------------------------------------------------------------- backward

@jax.custom_vjp
def grad_boundary(x):
  """Identity whose cotangent is materialised once, where XLA cannot fuse through it.

  The residual stream's cotangent is a chain of adds across the blocks. XLA:CPU's loop
  fusion copies that whole chain into every fusion that reads it, so each block's backward
  recomputes the adds of all later blocks: work quadratic in depth (fusions of 1100-1400
  instructions at d16; the d16 scales-0..7 gradient took 9.6 s instead of 5.3 s,
  launch/results/cpu_2026-11-27_sampling.md). Optimisation barriers do not stop it (XLA:CPU
  removes them before fusing); a conditional does. The backward here passes the cotangent
  through a `lax.cond` on a value only known at run time (false only if its first element is
  NaN; both branches return it unchanged), so the chain ends at every block.
  """
  return x


def _grad_boundary_fwd(x):
  return x, None


def _grad_boundary_bwd(_, g):
  first = g.reshape(-1)[0]
  # Two different (equal-valued) branches, so no pass can merge them into the identity.
  return (jax.lax.cond(first == first, lambda t: t, lambda t: -(-t), g),)


grad_boundary.defvjp(_grad_boundary_fwd, _grad_boundary_bwd)


def use_grad_boundaries(setting: str) -> bool:
  """'auto': on for the CPU and GPU backends, where they were measured to help.

  d16 training step per segment, off -> on: CPU fp32 batch 2, 9.9 -> 6.2 s (scales 0..7);
  H200 bf16 batch 32, 0.90-0.96x (launch/results/h200_2026-11-27.md). On a GPU the predicate
  costs a device-to-host copy per block; it was still faster. TPU: not measured, off.
  """
  if setting == 'auto':
    return jax.default_backend() in ('cpu', 'gpu')
  return setting == 'on'


# ----------------------------------------------------------------------------- model

class MVARTransformer(nn.Module):
  """Class-conditional next-scale predictor. See the module docstring for the call."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    c = cfg.width
    std = math.sqrt(1 / (3 * c))
    layout = cfg.layout
    first_l = layout.patch_nums[0] ** 2
    self.word_embed = _dense(c, ('cvae', 'embed'), trunc_normal(std), jnp.float32)
    embed_init = lambda names: nn.with_logical_partitioning(trunc_normal(std), names)
    self.class_emb = nn.Embed(cfg.num_classes + 1, c, param_dtype=jnp.float32,
                              embedding_init=embed_init(('classes', 'embed')))
    self.lvl_embed = nn.Embed(layout.num_scales, c, param_dtype=jnp.float32,
                              embedding_init=embed_init(('levels', 'embed')))
    self.pos_start = self.param('pos_start', embed_init((None, None, 'embed')), (1, first_l, c))
    self.pos_1LC = self.param('pos_1LC', embed_init((None, 'tokens', 'embed')),
                              (1, layout.total_len, c))
    block_cls = nn.remat(AdaLNSelfAttn, static_argnums=(3, 4, 5)) if cfg.remat else AdaLNSelfAttn
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
    self.blocks = [block_cls(cfg, drop_path_rate=float(rates[i]), name=f'blocks_{i}')
                   for i in range(cfg.depth)]
    self.head_nm = AdaLNBeforeHead(cfg)
    self.head = LogitsHead(cfg.vocab_size, trunc_normal(std, cfg.init_head))

  def condition(self, label_B, *, deterministic: bool = True):
    """Class dropout (training only) then the class embedding: (B, C) fp32."""
    cfg = self.config
    if not deterministic and cfg.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng('dropout'), label_B.shape) < cfg.cond_drop_rate
      label_B = jnp.where(drop, cfg.num_classes, label_B)
    return self.class_emb(label_B)

  def block_modulations(self, label_B) -> tuple:
    """Every block's AdaLN modulation of the class condition: depth arrays (B, 6C).

    They depend on the labels alone, so a sampler computes them once and passes them to each
    scale's call (`__call__(..., block_modulations=...)`): without that, every scale reads
    the depth ada_lin matrices again (a third of a d16 block's weights; ~30 ms per scale at
    batch 2 on a 2-core CPU), as the official samplers do. Inference only (no class dropout).
    """
    cond_BD = nn.with_logical_constraint(self.condition(label_B), ('activation_batch', None))
    cond_c = cond_BD.astype(DTYPES[self.config.dtype])
    return tuple(block.modulation(cond_c) for block in self.blocks)

  def embed_tokens(self, cond_BD, x_BlCv, first: int, last: int):
    """Token embeddings of scales first..last (fp32, (B, L_seg, C))."""
    layout = self.config.layout
    begin, end = layout.span(first, last)
    parts = []
    if first == 0:
      first_l = layout.patch_nums[0] ** 2
      b = cond_BD.shape[0]
      parts.append(jnp.broadcast_to(cond_BD[:, None, :], (b, first_l, cond_BD.shape[-1]))
                   + self.pos_start)
    if x_BlCv is not None and x_BlCv.shape[1] > 0:
      parts.append(self.word_embed(x_BlCv.astype(jnp.float32)))
    x_BLC = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    if x_BLC.shape[1] != end - begin:
      raise ValueError(f'scales {first}..{last} hold {end - begin} tokens; got '
                       f'{x_BLC.shape[1]} (teacher input {None if x_BlCv is None else x_BlCv.shape})')
    lvl = jnp.asarray(layout.level_ids(first, last))
    return x_BLC + self.lvl_embed(lvl)[None] + self.pos_1LC[:, begin:end]

  def __call__(self, label_B, x_BlCv=None, *, first: int = 0, last: int | None = None,
               train: bool = False, loop_blocks: bool = False, block_modulations=None):
    """Logits (B, L_seg, V) fp32 for the tokens of scales first..last.

    block_modulations (inference only): `block_modulations(label_B)` computed beforehand;
    same values as without.
    loop_blocks (inference only): run the blocks as one loop whose body switches between
    groups of blocks (`run_blocks_in_loop`) instead of unrolled; same values, a program with
    far fewer top-level kernels.
    """
    cfg = self.config
    last = cfg.layout.num_scales - 1 if last is None else last
    if not 0 <= first <= last < cfg.layout.num_scales:
      raise ValueError(f'need 0 <= first <= last < {cfg.layout.num_scales}, got {first}..{last}')
    if loop_blocks and train:
      raise ValueError('loop_blocks is for inference; train=True needs the unrolled blocks')
    if block_modulations is not None and train:
      raise ValueError('block_modulations is for inference (training drops classes)')
    mods = (None,) * cfg.depth if block_modulations is None else tuple(block_modulations)
    if len(mods) != cfg.depth:
      raise ValueError(f'block_modulations: need one per block ({cfg.depth}), got {len(mods)}')
    deterministic = not train
    # Split over the batch under a mesh (no-op without one). Unconstrained, XLA's partitioner
    # gathered the (B, 6C) AdaLN outputs over the global batch and, in the scales-0..7 step,
    # gave the residual stream the FSDP weights' 'embed' sharding and all-reduced activations:
    # 95.8 instead of 3.2 GB per device per step at d16, 8-way FSDP, 32 images per device
    # (launch/bench_comms.py). Constrained, the traffic is the weights' and gradients' alone,
    # the same at any batch size.
    cond_BD = nn.with_logical_constraint(self.condition(label_B, deterministic=deterministic),
                                         ('activation_batch', None))
    x_BLC = self.embed_tokens(cond_BD, x_BlCv, first, last)
    dtype = DTYPES[cfg.dtype]
    x_BLC, cond_c = x_BLC.astype(dtype), cond_BD.astype(dtype)
    if loop_blocks:
      x_BLC = run_blocks_in_loop(cfg, self.variables['params'], x_BLC, cond_c, first, last,
                                 mods)
    else:
      boundaries = train and use_grad_boundaries(cfg.grad_boundaries)
      for block, ada in zip(self.blocks, mods):
        # Without a modulation the call is the 5-argument one that nn.remat's static
        # arguments describe.
        x_BLC = block(x_BLC, cond_c, first, last, deterministic, *(() if ada is None else (ada,)))
        if boundaries:
          x_BLC = grad_boundary(x_BLC)
    h = self.head_nm(x_BLC.astype(jnp.float32), cond_BD)
    return self.head(h, _dot_general(cfg, deterministic)).astype(jnp.float32)


def run_blocks_in_loop(cfg: TransformerConfig, params, x_BLC, cond_BD, first: int, last: int,
                       modulations=None, blocks_per_step: int = 4):
  """The blocks in inference mode as a `fori_loop` over a `switch` between groups of blocks.

  The same operations as the unrolled stack, `blocks_per_step` blocks per branch (the largest
  divisor of depth up to it). The top-level program then holds one loop instead of `depth`
  copies of a block. XLA:CPU builds a kernel dependency graph per sequence, in time
  superlinear in its length, whenever an executable is compiled or a stored one is loaded:
  the stored d16 sampler loads in 2.8 s instead of 7.5 s. One block per branch loads as fast
  but samples ~4% slower; four blocks per branch sample as fast as the unrolled stack
  (launch/results/cpu_2026-11-26.md). modulations: per block, as `MVARTransformer.__call__`'s
  block_modulations, or None (computed in the loop).
  """
  group = max(g for g in range(1, blocks_per_step + 1) if cfg.depth % g == 0)
  block = AdaLNSelfAttn(cfg, parent=None)  # unbound: applied to each block's params
  modulations = (None,) * cfg.depth if modulations is None else tuple(modulations)

  def blocks(indices, x):
    for j in indices:
      x = block.apply({'params': params[f'blocks_{j}']}, x, cond_BD, first, last, True,
                      modulations[j])
    return x

  branches = [functools.partial(blocks, range(i, i + group)) for i in range(0, cfg.depth, group)]
  return jax.lax.fori_loop(0, len(branches), lambda i, x: jax.lax.switch(i, branches, x), x_BLC)


# One jitted init per (config, batch size): run eagerly, flax's init dispatches and compiles
# op by op (9 s at depth 1 on a 2-core CPU, against 2 s as one program), and a jit object
# made per call would retrace and recompile on every call.
@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: TransformerConfig, rng, batch_size: int = 1):
  """Freshly initialised (boxed, logically partitioned) parameters."""
  model = MVARTransformer(config)
  layout = config.layout
  label = jnp.zeros((batch_size,), jnp.int32)
  x = jnp.zeros((batch_size, layout.total_len - layout.patch_nums[0] ** 2, config.cvae))
  return model.init({'params': rng}, label, x)


def count_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nn.unbox(params)))
