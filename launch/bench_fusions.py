r"""The sampler's memory-bound pieces, each against its candidate replacements (GPU).

  python launch/bench_fusions.py                      # all parts, at the d16 batch-32 shapes
  python launch/bench_fusions.py --parts=select,gn --reps=5
  python launch/bench_fusions.py --smoke              # tiny shapes, CPU (Pallas interpreted)

Parts (each prints rows "part | variant | ms | vs first | check"):
- select: the top-k/top-p threshold of the largest scale's logits (8192 x 4096, k 900,
  p 0.96): the sort-based `sampling.kept_threshold` against the radix-select Pallas kernel
  (rows per program x warps). check: rows whose threshold differs from the sort's.
- addln: x + y * gamma then LN * (1 + scale) + shift over (64, 256, 1024) bf16: XLA's
  fusions against a Pallas kernel that does both (defined below). check: max |difference|.
- naqkv: the default attention kernel of MVAR sampling (`na2d_pallas_from_qkv`: the bias,
  q/k normalisation and the 7x7 window from the (B, N, 3, heads, D) projection) at the
  large scales' maps (64 maps = 32 images with CFG, 16 heads, D 64, bf16), per tile
  (query rows x key rows, warps, stages). check: max |difference| against the default tiles.
- gn: one decoder chunk (8 images, 16x16 latents -> 256 px, bf16 activations), with flax's
  nn.GroupNorm against ours (per-channel sums; two-pass, single-pass with XLA's pixel sums
  over rows of 1, 4 and GroupNorm.SUM_ROWS pixels, and single-pass with the sums' default:
  the Pallas kernel `kernels.pixel_sums` on GPU). check: max |difference| of the images
  against flax's.
- decode: the sampler's whole decode (`sampling.decode_in_chunks`: 32 images in chunks of 8,
  bf16; 4 in chunks of 2 in smoke) with the leading small-map stages in chunks or on the
  whole batch, and conv_out as a conv or as `vqvae.TapSumConv` (GroupNorm as by default in
  every row); then the default with SiLU through tanh, with the upsampling's bias in its
  conv and its phase interleave on 32-bit words, and with GroupNorm's sums by XLA instead
  of the Pallas kernel (GPU). check: max |image diff| against the first row.
- gelu: fc1 + bias + tanh-GELU (x (M, 1024) @ (1024, 4096), bf16) at every scale's M
  (64 sequences x tokens): XLA's matmul and GELU fusion against the Pallas kernel with the
  bias and GELU in the matmul's epilogue (mvar_jax/kernels/dense_gelu.py), per tile; then
  the sum over scales x 16 blocks. check: max |difference| against XLA.
- options: the transformer's forward at the last scale (64 sequences x 256 tokens, d16,
  bf16) and one decode chunk, compiled with XLA's defaults and with each set of
  --compiler_options (e.g. xla_gpu_enable_cublaslt: GELU and bias in the matmul's epilogue).
  check: max |output difference| against the defaults.

Times: a call is dispatched --inner times back to back, then waited for; ms per call is the
median over --reps such groups, after a warm-up group.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mvar_jax import sampling, transformer, vqvae  # noqa: E402
from mvar_jax.kernels import dense_gelu, select_threshold  # noqa: E402
from mvar_jax.kernels.neighborhood_attention import pallas_common as pc  # noqa: E402
from mvar_jax.kernels.neighborhood_attention import pallas_kernel  # noqa: E402

PARTS = ('select', 'addln', 'naqkv', 'gn', 'decode', 'gelu', 'options')
# XLA options that could move work into cuBLAS/cuDNN epilogues (each ';' is one compile).
DEFAULT_OPTIONS = ('xla_gpu_enable_cublaslt=true;xla_gpu_cudnn_gemm_fusion_level=2;'
                   'xla_gpu_cudnn_gemm_fusion_level=3;xla_gpu_enable_triton_gemm=false')


def per_call_ms(fn, *args, reps: int, inner: int) -> float:
  jax.block_until_ready(fn(*args))
  jax.block_until_ready([fn(*args) for _ in range(inner)])
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(inner)])
    times.append((time.perf_counter() - t) * 1e3 / inner)
  return statistics.median(times)


def _row(part, name, ms, base, check):
  print(f'{part:<9}| {name:<56}| {ms:9.3f} | {ms / base:6.2f}x | {check}', flush=True)


def bench_select(args, interpret):
  rows, v = (64, 512) if args.smoke else (8192, 4096)
  k = 90 if args.smoke else 900
  x = jax.random.normal(jax.random.key(0), (rows, v), jnp.float32) * 3
  x = x.at[:8, :16].set(1.25)  # ties
  ref_fn = jax.jit(lambda x: sampling.kept_threshold(x, top_k=k, top_p=0.96,
                                                     implementation='sort')[:, 0])
  ref = np.asarray(ref_fn(x))
  base = per_call_ms(ref_fn, x, reps=args.reps, inner=args.inner)
  _row('select', 'kept_threshold, lax.top_k sort', base, base, '')
  for block_rows, warps in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 8)):
    fn = jax.jit(functools.partial(select_threshold.kept_threshold_pallas, top_k=k, top_p=0.96,
                                   block_rows=block_rows, num_warps=warps, interpret=interpret))
    try:
      got = np.asarray(fn(x))
      ms = per_call_ms(fn, x, reps=args.reps, inner=args.inner)
    except Exception as e:  # noqa: BLE001  (a variant that does not compile is a row too)
      print(f'select   | pallas rows={block_rows} warps={warps}: failed: {str(e)[:300]}')
      continue
    _row('select', f'pallas rows={block_rows} warps={warps}', ms, base,
         f'{int(np.sum(got != ref))} rows differ')


# The candidate: the residual update and the AdaLN that reads it in one kernel (reads x and y
# once, writes x_new and h once; fp32 statistics of the rounded x_new). On an H200 it was
# 0.86x XLA's two fusions at the last scale (0.054 vs 0.063 ms): under 1 ms per sampler call,
# not worth a second code path in the transformer, so it lives here.
def _add_ln_kernel(x_ref, y_ref, g_ref, s_ref, t_ref, xo_ref, h_ref, *, eps: float):
  f32 = jnp.float32
  x_new = (x_ref[...].astype(f32) + y_ref[...].astype(f32) * g_ref[...].astype(f32)[None, :])
  x_new = x_new.astype(xo_ref.dtype)
  xo_ref[...] = x_new
  x32 = x_new.astype(f32)
  mean = jnp.mean(x32, axis=1, keepdims=True)
  centred = x32 - mean
  inv = jax.lax.rsqrt(jnp.mean(centred * centred, axis=1, keepdims=True) + eps)
  h = (centred * inv) * (1.0 + s_ref[...].astype(f32))[None, :]
  h_ref[...] = (h + t_ref[...].astype(f32)[None, :]).astype(h_ref.dtype)


@functools.partial(jax.jit, static_argnames=('eps', 'block_rows', 'num_warps', 'interpret'))
def add_modulated_layernorm(x_BLC, y_BLC, gamma_BC, scale_BC, shift_BC, *, eps: float,
                            block_rows: int = 16, num_warps: int = 4, interpret: bool = False):
  """(x + y * gamma, LN(x + y * gamma) * (1 + scale) + shift), both (B, L, C) in x's dtype."""
  b, l, c = x_BLC.shape
  if c & (c - 1):
    raise ValueError(f'add_modulated_layernorm: width {c} is not a power of two')
  row = pl.BlockSpec((None, block_rows, c), lambda i, j: (i, j, 0))
  vec = pl.BlockSpec((None, c), lambda i, j: (i, 0))
  out = jax.ShapeDtypeStruct(x_BLC.shape, x_BLC.dtype)
  return pl.pallas_call(
      functools.partial(_add_ln_kernel, eps=eps),
      grid=(b, pl.cdiv(l, block_rows)),
      in_specs=[row, row, vec, vec, vec],
      out_specs=[row, row],
      out_shape=[out, out],
      compiler_params=pc.compiler_params(num_warps, 1),
      interpret=interpret,
      name='add_modulated_ln',
  )(x_BLC, y_BLC, gamma_BC, scale_BC, shift_BC)


def bench_addln(args, interpret):
  b, l, c = (2, 40, 256) if args.smoke else (64, 256, 1024)
  ks = jax.random.split(jax.random.key(1), 5)
  x, y = (jax.random.normal(kk, (b, l, c), jnp.bfloat16) for kk in ks[:2])
  g, s, t = (jax.random.normal(kk, (b, c), jnp.bfloat16) * 0.3 for kk in ks[2:])

  @jax.jit
  def xla(x, y, g, s, t):
    x_new = x + y * g[:, None]
    return x_new, transformer._layer_norm(x_new, 1e-6) * (1 + s[:, None]) + t[:, None]

  ref = xla(x, y, g, s, t)
  base = per_call_ms(xla, x, y, g, s, t, reps=args.reps, inner=args.inner)
  _row('addln', 'XLA fusions', base, base, '')
  for block_rows, warps in ((8, 4), (16, 4), (16, 8), (32, 8)):
    fn = functools.partial(add_modulated_layernorm, eps=1e-6,
                           block_rows=block_rows, num_warps=warps, interpret=interpret)
    try:
      got = fn(x, y, g, s, t)
      ms = per_call_ms(fn, x, y, g, s, t, reps=args.reps, inner=args.inner)
    except Exception as e:  # noqa: BLE001
      print(f'addln    | pallas rows={block_rows} warps={warps}: failed: {str(e)[:300]}')
      continue
    err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))))
              for a, r in zip(got, ref))
    _row('addln', f'pallas rows={block_rows} warps={warps}', ms, base, f'max diff {err:.3g}')


# (block_q, block_k, num_warps, num_stages) of the forward; the first is the default.
NAQKV_TILES = ((64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 3),
               (128, 128, 8, 2), (32, 64, 4, 2))


def bench_naqkv(args, interpret):
  sides, batch, heads = ((8,), 2, 2) if args.smoke else ((13, 16), 64, 16)
  for side in sides:
    key = jax.random.split(jax.random.key(side), 3)
    qkv = jax.random.normal(key[0], (batch, side * side, 3, heads, 64)).astype(jnp.bfloat16)
    head_scale = jnp.exp(jax.random.normal(key[1], (heads,)))
    bias = (0.1 * jax.random.normal(key[2], (3, heads, 64))).astype(jnp.bfloat16)
    ref, base = None, None
    for block_q, block_k, warps, stages in NAQKV_TILES[:3] if args.smoke else NAQKV_TILES:
      tiles = pc.BlockSizes(block_q=block_q, block_k=block_k, num_warps=warps,
                            num_stages=stages)
      fn = jax.jit(lambda x, s, b, tiles=tiles, side=side: pallas_kernel.na2d_pallas_from_qkv(
          x, s, height=side, width=side, kernel_size=7, bias_3HD=b, block_sizes=tiles,
          interpret=interpret))
      name = f'{side}x{side}, q {block_q} k {block_k} w{warps} s{stages}'
      try:
        out = fn(qkv, head_scale, bias).astype(jnp.float32)
        ms = per_call_ms(fn, qkv, head_scale, bias, reps=args.reps, inner=args.inner)
      except Exception as e:  # noqa: BLE001  (a tile Triton cannot take is a row too)
        print(f'naqkv    | {name}: failed: {str(e).splitlines()[0][:200]}')
        continue
      if ref is None:
        ref, base = out, ms
      _row('naqkv', name, ms, base, f'max diff {float(jnp.max(jnp.abs(out - ref))):.3g}')


def _decode_chunk_input(smoke: bool):
  """(VQ-VAE config with a bf16 decoder, f_hat of one sampler chunk: 8 images, 2 in smoke)."""
  if smoke:
    cfg = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=8,
                            vocab_size=64, patch_nums=(1, 2, 4), decoder_dtype='bfloat16')
  else:
    cfg = vqvae.VQVAEConfig(decoder_dtype='bfloat16', precision='default')
  pn = cfg.patch_nums[-1]
  f = jax.random.normal(jax.random.key(2), (2 if smoke else 8, pn, pn, cfg.z_channels))
  return cfg, f


def _flax_norm(cfg, name, dtype=jnp.float32):
  return nn.GroupNorm(num_groups=cfg.norm_groups, epsilon=1e-6, use_fast_variance=False,
                      name=name, dtype=dtype)


def bench_gn(args, interpret):
  del interpret
  cfg, f = _decode_chunk_input(args.smoke)
  params = vqvae.random_params(cfg)
  model = vqvae.VQVAE(cfg)
  decode = lambda p, f: model.apply({'params': p}, f, method=vqvae.VQVAE.fhat_to_img)
  rows = vqvae.GroupNorm.SUM_ROWS
  variants = [('flax nn.GroupNorm', _flax_norm),
              ('ours, two-pass', functools.partial(_our_norm, single=False)),
              ('single pass, XLA sums over C-wide rows', functools.partial(_rows_norm, rows=1)),
              ('single pass, XLA sums over rows of 4 pixels', functools.partial(_rows_norm, rows=4)),
              (f'single pass, XLA sums over rows of {rows} pixels (before)',
               functools.partial(_rows_norm, rows=rows)),
              ('single pass, default sums (the Pallas kernel on GPU)',
               functools.partial(_our_norm, single=True))]
  _time_with_hooks('gn', [(name, {'_norm': norm}, decode) for name, norm in variants],
                   (params, f), args)


def _time_with_hooks(part, variants, fn_args, args):
  """A row per (name, hooks, fn): fn(*fn_args) traced anew with `vqvae`'s module-level hooks
  (`_norm`, `_conv_out`, ...) set as `hooks` says (the others as they are), then timed;
  check: max |difference| against the first row's output. The hooks are restored after."""
  originals = {hook: getattr(vqvae, hook) for _, hooks, _ in variants for hook in hooks}
  ref, base = None, None
  try:
    for name, hooks, body in variants:
      for hook, value in {**originals, **hooks}.items():
        setattr(vqvae, hook, value)
      # A new function, traced now with these hooks (`body` must not be jitted itself: its
      # cache would hand every row the first one's trace).
      fn = jax.jit(lambda *a, body=body: body(*a))
      out = fn(*fn_args)
      ms = per_call_ms(fn, *fn_args, reps=args.reps, inner=max(1, args.inner // 4))
      if ref is None:
        ref, base = out, ms
      _row(part, name, ms, base, f'max |image diff| {float(jnp.max(jnp.abs(out - ref))):.3g}')
  finally:
    for hook, value in originals.items():
      setattr(vqvae, hook, value)


def _as_conv(cfg, dtype):
  """conv_out as a conv in `dtype` (cuDNN's kernel on a GPU), as before TapSumConv."""
  conv = vqvae._conv(cfg, cfg.in_channels, 3, 'conv_out', dtype=dtype)
  return lambda x: conv(x).astype(jnp.float32)


def _xla_sums_norm(cfg, name, dtype=jnp.float32):
  """vqvae._norm with the single pass's sums by XLA, as before the Pallas kernel."""
  return vqvae.GroupNorm(cfg.norm_groups, 1e-6, dtype, single_pass=jnp.dtype(dtype).itemsize < 4,
                         sums='xla', name=name)


def _silu_tanh(x):
  """x * sigmoid(x) as x * (1 + tanh(x / 2)) / 2 in fp32: no exp and no division by a
  computed value (XLA's fp32 division is IEEE's, many instructions)."""
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jnp.tanh(0.5 * x32))).astype(x.dtype)


def _phases_as_words(y_BhwabC, bias_C):
  """The bias added to the phases (where cuDNN can take it into the conv), then the
  interleave moving pairs of 16-bit values as 32-bit words: half the elements to index."""
  y = y_BhwabC + bias_C
  c = y.shape[-1]
  if jnp.dtype(y.dtype).itemsize != 2 or c % 2:
    return vqvae._interleave_phases(y)
  words = jax.lax.bitcast_convert_type(y.reshape(*y.shape[:-1], c // 2, 2), jnp.uint32)
  out = jax.lax.bitcast_convert_type(vqvae._interleave_phases(words), y.dtype)
  return out.reshape(*out.shape[:-2], c)


class _TracedTokenizer:
  """The Tokenizer methods `sampling.decode_in_chunks` calls, without their own jit (whose
  cache would hand every variant the first one's trace)."""

  def __init__(self, tok):
    self.config, self._tok = tok.config, tok

  def cast_for_decode(self, params):
    return self._tok.cast_for_decode(params)

  def fhat_to_img(self, params, f_hat):
    return self._tok._apply(params, vqvae.VQVAE.fhat_to_img, f_hat)

  def decode_stages(self, params, x, begin, end=None):
    return self._tok._apply(params, vqvae.VQVAE.decode_stages, x, begin, end)


def bench_decode(args, interpret):
  del interpret
  cfg, _ = _decode_chunk_input(args.smoke)
  b, chunk = (4, 2) if args.smoke else (32, sampling.DEFAULT_DECODE_BATCH)
  pn = cfg.patch_nums[-1]
  f = jax.random.normal(jax.random.key(3), (b, pn, pn, cfg.z_channels))
  tok = _TracedTokenizer(vqvae.Tokenizer(cfg))
  params = vqvae.random_params(cfg)
  whole = sampling.whole_batch_decoder_stages(cfg)
  conv = {'_conv_out': _as_conv}
  variants = [('all stages in chunks, conv_out a conv (as before)', 0, conv),
              ('all stages in chunks, conv_out as tap sums', 0, {}),
              (f'first {whole} stages whole, conv_out a conv', whole, conv),
              (f'first {whole} stages whole, conv_out as tap sums (default)', whole, {}),
              ('default, SiLU as x * (1 + tanh(x / 2)) / 2', whole, {'_silu': _silu_tanh}),
              ('default, upsampling: bias in the conv, bf16 pairs as words', whole,
               {'_phases_to_image': _phases_as_words}),
              ('default, GroupNorm sums by XLA (as before)', whole, {'_norm': _xla_sums_norm})]
  decode = lambda stages: lambda p, f: sampling.decode_in_chunks(tok, p, f, chunk, stages)
  _time_with_hooks('decode', [(name, hooks, decode(stages)) for name, stages, hooks in variants],
                   (params, f), args)


def _our_norm(cfg, name, dtype=jnp.float32, *, single):
  return vqvae.GroupNorm(cfg.norm_groups, 1e-6, dtype, single_pass=single, name=name)


def _rows_norm(cfg, name, dtype=jnp.float32, *, rows):
  """vqvae.GroupNorm, single pass, XLA's pixel sums over rows of `rows` pixels (1: C wide)."""
  cls = type(f'GroupNormRows{rows}', (vqvae.GroupNorm,), {'SUM_ROWS': rows})
  return cls(cfg.norm_groups, 1e-6, dtype, single_pass=True, sums='xla', name=name)


# fc1 + GELU: the FFN's hidden activation written once (mvar_jax/kernels/dense_gelu.py)
# instead of XLA's matmul then a GELU pass that reads and writes it again.
FC1_TILES = ((128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4),
             (64, 128, 64, 4, 3), (64, 256, 64, 4, 4))


def bench_gelu(args, interpret):
  """fc1 + tanh-GELU at every scale of the sampler (64 sequences: batch 32 with CFG): XLA's
  matmul + GELU fusion against the Pallas kernel per tile; then both summed over the scales
  and the 16 blocks (ms per sampler call)."""
  c, hidden = (64, 256) if args.smoke else (1024, 4096)
  patch_nums = (1, 4) if args.smoke else (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  blocks = 2 if args.smoke else 16
  ks = jax.random.split(jax.random.key(5), 3)
  w = (jax.random.normal(ks[1], (c, hidden)) * c ** -0.5).astype(jnp.bfloat16)
  b = (jax.random.normal(ks[2], (hidden,)) * 0.1).astype(jnp.bfloat16)
  xla = jax.jit(lambda x, w, b: jax.nn.gelu(x @ w + b, approximate=True))
  tiles = [dense_gelu.Tiles(*t) for t in FC1_TILES]
  totals = {'xla': 0.0, **{t: 0.0 for t in tiles}}
  for pn in patch_nums:
    m = 64 * pn * pn
    x = jax.random.normal(ks[0], (m, c), jnp.bfloat16)
    ref = xla(x, w, b)
    base = per_call_ms(xla, x, w, b, reps=args.reps, inner=args.inner)
    totals['xla'] += base * blocks
    _row('gelu', f'M {m}: XLA matmul + GELU fusion', base, base, '')
    for t in tiles:
      fn = jax.jit(functools.partial(dense_gelu.dense_gelu_pallas, tiles=t, interpret=interpret))
      name = f'M {m}: pallas {t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}'
      try:
        out = fn(x, w, b)
        ms = per_call_ms(fn, x, w, b, reps=args.reps, inner=args.inner)
      except Exception as e:  # noqa: BLE001
        print(f'gelu     | {name}: failed: {str(e).splitlines()[0][:200]}')
        totals[t] = float('nan')
        continue
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
      totals[t] += ms * blocks
      _row('gelu', name, ms, base, f'max diff {err:.3g}')
  for t, total in totals.items():
    name = 'XLA' if t == 'xla' else (f'pallas {t.block_m}x{t.block_n}x{t.block_k} '
                                     f'w{t.num_warps} s{t.num_stages}')
    _row('gelu', f'all scales x {blocks} blocks: {name}', total, totals['xla'], 'ms per call')


def parse_options(text: str) -> list[dict]:
  """'a=true,b=2;c=x' -> [{'a': True, 'b': 2}, {'c': 'x'}]: XLA option sets, one per ';'."""
  def value(v):
    if v.lower() in ('true', 'false'):
      return v.lower() == 'true'
    try:
      return int(v)
    except ValueError:
      return v
  sets = []
  for group in filter(None, (g.strip() for g in text.split(';'))):
    sets.append({k.strip(): value(v.strip()) for k, v in
                 (item.split('=', 1) for item in group.split(',') if item.strip())})
  return sets


def _last_scale_forward(smoke: bool):
  """(jitted fn, args): the transformer's forward at the last scale, bf16, random params."""
  depth, b = (2, 4) if smoke else (16, 64)
  cfg = transformer.preset(depth, dtype='bfloat16')
  model = transformer.MVARTransformer(cfg)
  abstract = nn.unbox(jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0))))
  params = jax.tree_util.tree_map(  # random bf16 matrices (as --param_dtype=bfloat16)
      lambda s: (jax.random.normal(jax.random.key(3), s.shape) * 0.02).astype(
          jnp.bfloat16 if len(s.shape) >= 2 else jnp.float32), abstract)
  last = cfg.layout.num_scales - 1
  pn = cfg.layout.patch_nums[last]
  x = jax.random.normal(jax.random.key(4), (b, pn * pn, cfg.cvae), jnp.float32)
  labels = jnp.arange(b, dtype=jnp.int32) % cfg.num_classes
  return jax.jit(lambda p, l, x: model.apply(p, l, x, first=last, last=last)), (params, labels, x)


def _decode_chunk(smoke: bool):
  """(jitted fn, args): one bf16 decode of the sampler's chunk, random params pre-cast."""
  cfg, f = _decode_chunk_input(smoke)
  tok = vqvae.Tokenizer(cfg)
  params = tok.cast_for_decode(vqvae.random_params(cfg))
  return jax.jit(lambda p, f: tok.fhat_to_img(p, f)), (params, f)


def bench_options(args, interpret):
  """The transformer's last-scale forward and a decode chunk under XLA option sets."""
  del interpret
  for what, (fn, fn_args) in (('forward', _last_scale_forward(args.smoke)),
                              ('decode', _decode_chunk(args.smoke))):
    ref, base = None, None
    for opts in [{}] + parse_options(args.compiler_options):
      name = f'{what}: ' + (','.join(f'{k}={v}' for k, v in opts.items()) or 'XLA defaults')
      try:
        lowered = fn.lower(*fn_args)
        compiled = lowered.compile(opts) if opts else lowered.compile()
        out = compiled(*fn_args)
        ms = per_call_ms(compiled, *fn_args, reps=args.reps, inner=args.inner)
      except Exception as e:  # noqa: BLE001  (an option this XLA does not know is a row too)
        print(f'options  | {name}: failed: {str(e).splitlines()[0][:200]}')
        continue
      if ref is None:
        ref, base = out, ms
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
      _row('options', name, ms, base, f'max diff {err:.3g}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--parts', default=','.join(PARTS))
  p.add_argument('--reps', type=int, default=7)
  p.add_argument('--inner', type=int, default=20)
  p.add_argument('--smoke', action='store_true', help='tiny shapes; Pallas interpreted off GPU')
  p.add_argument('--compiler_options', default=DEFAULT_OPTIONS,
                 help="the options part's XLA option sets: 'a=true,b=2;c=3' (';' separates sets)")
  args = p.parse_args(argv)
  unknown = set(args.parts.split(',')) - set(PARTS)
  if unknown:
    p.error(f'--parts: unknown {sorted(unknown)}; choose from {",".join(PARTS)}')
  interpret = jax.default_backend() != 'gpu'
  print(f'# {jax.devices()[0].device_kind}, jax {jax.__version__}; ms per call, median of '
        f'{args.reps} groups of {args.inner}' + (' (smoke)' if args.smoke else ''))
  print(f'{"part":<9}| {"variant":<56}| {"ms":>9} | {"ratio":>7} | check')
  for part in args.parts.split(','):
    globals()[f'bench_{part}'](args, interpret)


if __name__ == '__main__':
  main()
