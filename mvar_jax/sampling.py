"""KV-cache-free class-conditional sampling.

    out = sample(transformer, t_params, vqvae, v_params, key=jax.random.key(0),
                 labels=jnp.array([207, 360]), cfg=2.7, top_k=1200, top_p=0.99)
    out.images_BHW3  # float32 in [0, 1]
    out.ids          # one (B, pn*pn) int32 array per scale

Under scale-Markov conditioning each scale's forward pass sees only that scale's
tokens (the accumulated feature map resized to the scale), so no KV cache is kept.
In 'var' attention mode the prefix is recomputed every scale (exact, slower).

Per scale si of K: logits of the (CFG-doubled) batch; guidance
(1 + t) * cond - t * uncond with t = cfg * si / (K - 1) and the null class
(skipped altogether when cfg == 1, as upstream); top-k (drop logits below the k-th
largest), then top-p (sort ascending, drop where the cumulative softmax <= 1 - p,
never the max); sample. `more_smooth` (visualisation only) replaces the code
vectors by a Gumbel-softmax mixture with tau = max(0.27 (1 - 0.95 r), 0.005) on
logits * (1 + r), r = si / (K - 1).

One executable per (batch size, static options, parameter shapes) is cached, in the process
and, with the persistent compilation cache on, on disk (`compile_sampler`; a new process
then neither traces nor compiles); cfg and top_p are arguments, so changing them does not
recompile. `compile_sampler(...)` returns that executable: its memory analysis is the
program that `sample` runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax import compilation_cache, xla_cpu
from mvar_jax import vqvae as vqvae_lib
from mvar_jax.kernels import select_threshold


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  ids: list  # per scale, (B, pn*pn) int32
  images_BHW3: jax.Array  # float32 in [0, 1]
  labels_B: jax.Array  # int32 conditioning labels


def top_k_top_p_filter(logits_BlV, *, top_k: int, top_p, implementation: str = 'auto'):
  """Sets filtered logits to -inf with the official semantics (top-k first, then top-p).

  top_k: keep logits >= the k-th largest (ties kept); 0 disables.
  top_p: sort ascending, drop tokens whose cumulative softmax is <= 1 - top_p; the
    largest logit is always kept; 1.0 keeps every token of non-zero probability.
  implementation: of the threshold, as in `kept_threshold`.
  """
  thr = kept_threshold(logits_BlV, top_k=top_k, top_p=top_p, implementation=implementation)
  return jnp.where(logits_BlV < thr, -jnp.inf, logits_BlV)


THRESHOLD_IMPLEMENTATIONS = ('auto', 'sort', 'pallas')


def kept_threshold(logits_BlV, *, top_k: int, top_p, implementation: str = 'auto'):
  """(..., 1) smallest kept logit: a token is kept iff its logit is >= it.

  implementation: 'sort' (below), 'pallas' (`kernels.select_threshold`: radix selection in
  one kernel, no sort; GPU) or 'auto' (pallas on GPU, else sort).

  Both rules keep a set closed upwards, so one threshold describes it and the filter is a
  single compare over the vocabulary. Upstream sorts the whole vocabulary twice (argsort,
  then the inverse permutation); here only the k largest values are sorted, by
  `lax.top_k` (or one value sort when top-k is off), and top-p scans those k.
  Logits tied exactly at the top-p boundary are all kept (upstream keeps whichever of them
  its unstable sort puts last); everywhere else the kept set is upstream's.
  """
  if implementation not in THRESHOLD_IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {THRESHOLD_IMPLEMENTATIONS}, '
                     f'got {implementation!r}')
  if implementation == 'auto':
    implementation = 'pallas' if jax.default_backend() == 'gpu' else 'sort'
  v = logits_BlV.shape[-1]
  if implementation == 'pallas':
    if jnp.ndim(top_p):  # per row: (..., 1) against logits (..., V)
      top_p = jnp.broadcast_to(top_p, logits_BlV.shape[:-1] + (1,)).reshape(-1)
    thr = select_threshold.kept_threshold_pallas(logits_BlV.reshape(-1, v), top_k=top_k,
                                                 top_p=top_p)
    return thr.reshape(*logits_BlV.shape[:-1], 1)
  if 0 < top_k < v:
    # On a 2-D operand XLA:CPU keeps top-k as its TopK kernel; on 3-D it falls back to a
    # full sort of the vocabulary (4x slower at V=4096, k=900).
    flat = logits_BlV.reshape(-1, v)
    desc = jax.lax.top_k(flat, top_k)[0].reshape(*logits_BlV.shape[:-1], top_k)  # descending
    kth = desc[..., -1:]
    # Tokens tied with the k-th largest beyond the k (upstream keeps them) sit at the
    # bottom of the ascending order: they add their mass to every cumulative sum.
    n_tied = jnp.sum(logits_BlV >= kth, axis=-1, keepdims=True) - top_k
  else:
    desc = -jnp.sort(-logits_BlV, axis=-1)
    kth, n_tied = desc[..., -1:], 0
  top = desc[..., :1]
  mass = jnp.exp(desc - top)  # unnormalised softmax of the kept values
  tied_mass = n_tied * jnp.exp(kth - top)
  total = jnp.sum(mass, axis=-1, keepdims=True) + tied_mass
  probs = mass / total
  # Upstream's ascending cumulative sum, read in descending order: a reverse cumsum
  # (summed from the small end, as upstream does).
  cum_asc = jnp.flip(jnp.cumsum(jnp.flip(probs, -1), axis=-1), -1) + tied_mass / total
  keep = (cum_asc > 1.0 - top_p).at[..., 0].set(True)  # a prefix: cum_asc is non-increasing
  last_kept = jnp.sum(keep, axis=-1, keepdims=True) - 1
  return jnp.take_along_axis(desc, last_kept, axis=-1)


def guidance(logits_2BlV, t):
  """(1 + t) * cond - t * uncond for a batch stacked as [cond; uncond]."""
  b = logits_2BlV.shape[0] // 2
  return (1 + t) * logits_2BlV[:b] - t * logits_2BlV[b:]


def validate_sampling_args(*, num_classes: int, labels, cfg, top_k, top_p) -> None:
  """Raises ValueError naming the argument and the allowed range."""
  if not np.isfinite(cfg) or cfg < 0:
    raise ValueError(f'cfg must be a finite number >= 0, got {cfg}')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1] (1 disables it), got {top_p}')
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f'top_k must be an integer >= 0 (0 disables it), got {top_k}')
  if labels is not None:
    arr = np.asarray(labels)
    if arr.ndim != 1:
      raise ValueError(f'labels must be a 1-D array of class ids, got shape {arr.shape}')
    if arr.size and (arr.min() < 0 or arr.max() > num_classes):
      raise ValueError(f'labels must be in [0, {num_classes}] ({num_classes} = unconditional), '
                       f'got values in [{arr.min()}, {arr.max()}]')


DEFAULT_DECODE_BATCH = 8  # images per VQ-VAE decoder call inside the sampler


def whole_batch_decoder_stages(config: vqvae_lib.VQVAEConfig) -> int:
  """How many leading decoder stages `decode_in_chunks` runs on the whole batch: those whose
  output side is at most a quarter of the image's (at 256 px: conv_in and mid, up_4 and
  up_3, up to 64 px). Per image their largest map is an eighth of a full-resolution one
  (1/16 of the pixels, 2x the channels): 2.6 MB in bf16 at 256 px, less than the image's
  share of the last scale's fp32 logits (8 MB)."""
  sides = vqvae_lib.decoder_stage_sides(config)
  return next(i for i, side in enumerate(sides) if side > config.resolution // 4)


def decode_in_chunks(vqvae, v_params, f_hat_BhwC, decode_batch: int,
                     whole_batch_stages: int | None = None):
  """Images in [-1, 1] of f_hat, `decode_batch` images at a time (0: all at once).

  The decoder's 256 px activations dominate the sampler's memory (at batch 32, 160
  channels at 256x256 are 1.3 GB per tensor in fp32); a lax.map over chunks bounds them by
  the chunk, at the cost of a loop the backend cannot parallelise across chunks. The first
  `whole_batch_stages` decoder stages (default: `whole_batch_decoder_stages`, the maps up to
  a quarter of the image's side) run on all images at once: in chunks they are hundreds of
  kernels too small to fill a GPU (d16, batch 32 on an H100: ~5 of the decode's 36.5 ms
  went to the 16 and 32 px levels, run once per chunk).
  """
  b = f_hat_BhwC.shape[0]
  v_params = vqvae.cast_for_decode(v_params)  # once, not per chunk
  if not decode_batch or decode_batch >= b:
    return vqvae.fhat_to_img(v_params, f_hat_BhwC)
  split = (whole_batch_decoder_stages(vqvae.config) if whole_batch_stages is None
           else int(whole_batch_stages))
  x = vqvae.decode_stages(v_params, f_hat_BhwC, 0, split) if split else f_hat_BhwC
  pad = -b % decode_batch
  x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  x = x.reshape(-1, decode_batch, *x.shape[1:])
  img = jax.lax.map(lambda chunk: jnp.clip(vqvae.decode_stages(v_params, chunk, split), -1, 1), x)
  return img.reshape(-1, *img.shape[2:])[:b]


def _scales(t_params, v_params, labels_B, key, cfg, top_p, carry, *, first: int, stop: int,
            transformer, vqvae, top_k, more_smooth, use_cfg, loop_blocks=False):
  """Scales first..stop-1 of the loop: returns (their ids, carry).

  carry: (f_hat (B, pn_K, pn_K, C) fp32 after scale first-1, the teacher inputs the next
  scale reads: MVAR the last one, VAR all of them), or None at scale 0.
  loop_blocks: the transformer's blocks as a loop (see `loops_blocks`).
  """
  tcfg = transformer.config
  layout = tcfg.layout
  k_scales = layout.num_scales
  var_mode = tcfg.attention.mode == 'var'
  b = labels_B.shape[0]
  null = jnp.full_like(labels_B, tcfg.num_classes)
  model_labels = jnp.concatenate([labels_B, null]) if use_cfg else labels_B
  codebook_VC = vqvae.codebook(v_params)
  if carry is None:
    pn_last = layout.patch_nums[-1]
    carry = (jnp.zeros((b, pn_last, pn_last, tcfg.cvae), jnp.float32), ())
  f_hat, prefix = carry
  prefix = list(prefix)  # teacher inputs of the scales before (MVAR: the last only)
  # The blocks' AdaLN modulations depend on the labels alone: computed once, not per scale.
  modulations = transformer.apply(t_params, model_labels, method='block_modulations')
  ids = []
  # The caller's key: its first half draws random labels (`sample`), the second drives the
  # scales. Split here, not eagerly: an eager split compiles a program of its own in every
  # new process.
  keys = jax.random.split(jax.random.split(key)[1], 2 * k_scales)
  for si in range(first, stop):
    pn = layout.patch_nums[si]
    ratio = si / (k_scales - 1) if k_scales > 1 else 0.0
    if var_mode:
      x = jnp.concatenate(prefix, axis=1) if prefix else None
      scale_first = 0
    else:
      x, scale_first = (prefix[-1] if prefix else None), si
    if x is not None and use_cfg:
      x = jnp.concatenate([x, x])
    logits = transformer.apply(t_params, model_labels, x, first=scale_first, last=si,
                               loop_blocks=loop_blocks, block_modulations=modulations)
    logits = logits[:, -pn * pn:]
    if use_cfg:
      logits = guidance(logits, cfg * ratio)
    logits = top_k_top_p_filter(logits, top_k=top_k, top_p=top_p)
    idx_Bl = jax.random.categorical(keys[2 * si], logits, axis=-1).astype(jnp.int32)
    ids.append(idx_Bl)
    if more_smooth:
      tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
      gumbel = jax.random.gumbel(keys[2 * si + 1], logits.shape)
      weights = jax.nn.softmax((logits * (1 + ratio) + gumbel) / tau, axis=-1)
      h_BlC = weights @ codebook_VC
    else:
      h_BlC = codebook_VC[idx_Bl]
    h_BhwC = h_BlC.reshape(b, pn, pn, -1)
    f_hat, next_map = vqvae.next_input(v_params, si, f_hat, h_BhwC)
    if si + 1 < k_scales:
      next_BlC = next_map.reshape(b, -1, next_map.shape[-1])
      prefix = prefix + [next_BlC] if var_mode else [next_BlC]
  return ids, (f_hat, tuple(prefix))


def _scale_loop(t_params, v_params, labels_B, key, cfg, top_p, carry=None, *, first: int = 0,
                transformer, vqvae, decode_batch=DEFAULT_DECODE_BATCH, **kw):
  """The traced body: scales first..K-1 from `carry` (None: the whole loop), then the decode;
  returns (ids of those scales, images in [0, 1]). A split sampler's second program is this
  with first = split and the first program's carry."""
  ids, (f_hat, _) = _scales(t_params, v_params, labels_B, key, cfg, top_p, carry, first=first,
                            stop=transformer.config.layout.num_scales, transformer=transformer,
                            vqvae=vqvae, **kw)
  images = (decode_in_chunks(vqvae, v_params, f_hat, decode_batch) + 1.0) * 0.5
  return ids, images


def _scale_loop_head(t_params, v_params, labels_B, key, cfg, top_p, *, split: int, **kw):
  """A split sampler's first program: scales 0..split-1 -> (ids, carry)."""
  return _scales(t_params, v_params, labels_B, key, cfg, top_p, None, first=0, stop=split, **kw)


def _variables(params):
  """Accepts bare params or a {'params': ...} variables dict."""
  return params if 'params' in params else {'params': params}


# XLA:CPU's YNNPACK fusions are off for the sampler. The "eltwise" ones take the scalar
# constants of an elementwise chain (the tanh-GELU's 0.5, 1, sqrt(2/pi), 0.044715) as operands
# broadcast to the full activation shape; in the unrolled sampler CSE shares those broadcasts
# between the 16 blocks of a scale and the scheduler materialises them up front, so four
# (2B, L, 4096) fp32 tensors per large scale stay live for the whole call: 2.2 of the 3.3 GiB
# of temporaries at d16, batch 32 (and a fused subgraph's inner tensors are invisible to
# `memory_analysis`). Without any YNNPACK fusion the d16 sampler runs in the same CPU time,
# compiles faster, and a new process loads its stored executable in 10 instead of 14 CPU
# seconds (single-dot fusions: same memory, slower load). Measurements: launch/README.md.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}
# The scales with many rows are the exception: there YNNPACK's matmuls, one dot per fusion
# (no epilogue, so no broadcast constants; same `memory_analysis`), beat Eigen's, which win on
# the few rows of the small scales (their weight reads dominate). d16, 2-core AMD EPYC, one
# scale's forward at batch 2 (4 rows per token with CFG), ms: 4 rows 107 (Eigen) / 152
# (YNNPACK), 36 rows 225 / 288, 256 rows 1123 / 914, 1024 rows 4390 / 4079. So on CPU the
# sampler is two programs, split at the first scale of `_CPU_DOT_MIN_ROWS` rows
# (`cpu_split`): the whole d16 batch-2 call took 0.91x the one-program time (7 interleaved
# pairs). YNNPACK in every scale was as fast but its executable loads in 14 s instead of
# 4 s (a new process's first call); split, the two load in 6 s.
_CPU_LARGE_SCALE_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                            'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
_CPU_DOT_MIN_ROWS = 256
# On GPUs the sampler's matmuls go to cuBLAS rather than XLA's Triton GEMMs. With Triton GEMMs
# on, XLA never folds the FFN's bias + GELU into cuBLAS's epilogue (a separate GELU pass per
# block); without them it does. H100, d16, batch 32 (launch/results/h100_2026-11-27.md): 79
# instead of 81 ms per call, and the first compile in 51 instead of 85 s.
_GPU_OPTIONS = {'xla_gpu_enable_triton_gemm': False}


@functools.lru_cache(maxsize=None)
def compiler_options(backend: str | None = None) -> tuple:
  """The XLA options the sampler compiles with on `backend` (default: JAX's), as items.

  GPU: `_GPU_OPTIONS`. CPU: `_CPU_OPTIONS`, or none on an XLA:CPU that does not know the
  option (it is experimental; a one-op program is compiled with it once to find out). TPU: none.
  """
  backend = backend or jax.default_backend()
  if backend in ('gpu', 'cuda', 'rocm'):
    return tuple(_GPU_OPTIONS.items())
  return xla_cpu.on_cpu(_CPU_OPTIONS, backend)


def cpu_split(layout, batch_size: int, use_cfg: bool) -> tuple[int | None, dict]:
  """(split_at_scale, options of the later program) of the CPU sampler's default.

  The later program holds the scales from the first one whose transformer rows (batch, twice
  with CFG, times tokens) reach `_CPU_DOT_MIN_ROWS`. (None, {}) when no scale does (one
  program, `_CPU_OPTIONS`) or on an XLA:CPU without the option; (None, options) when scale 0
  already does (one program with them).
  """
  options = dict(xla_cpu.options_if_known(_CPU_LARGE_SCALE_OPTIONS))
  rows = [batch_size * (2 if use_cfg else 1) * pn * pn for pn in layout.patch_nums]
  first = next((si for si, r in enumerate(rows) if r >= _CPU_DOT_MIN_ROWS), None)
  if not options or first is None:
    return None, {}
  return (first or None), options


def loops_blocks(backend: str | None = None) -> bool:
  """Whether the sampler runs the transformer's blocks as a loop on `backend`.

  On CPU: a program with one block loop per scale instead of depth unrolled blocks loads
  from the compilation cache 2.6x faster (XLA:CPU rebuilds a kernel dependency graph whose
  cost grows faster than the kernel count) and samples as fast (four blocks per branch).
  Elsewhere the blocks stay unrolled: a GPU conditional reads its branch index on the host
  every step, and on an H200 the looped d16 sampler had not compiled after 170 s, against
  ~90 s unrolled (launch/results/h200_2026-11-26.md).
  """
  return (backend or jax.default_backend()) == 'cpu'


@functools.lru_cache(maxsize=64)
def _compiled(transformer, vqvae, batch_size: int, top_k: int, more_smooth: bool, use_cfg: bool,
              decode_batch: int, loop_blocks: bool, xla_options: tuple = (), part: str = 'all',
              split: int = 0):
  """The jitted program: the whole loop ('all'), or a split sampler's 'head' or 'tail'."""
  del batch_size  # part of the cache key: one executable per batch size
  kw = dict(transformer=transformer, vqvae=vqvae, top_k=top_k, more_smooth=more_smooth,
            use_cfg=use_cfg, loop_blocks=loop_blocks)
  if part == 'all':
    fn = functools.partial(_scale_loop, decode_batch=decode_batch, **kw)
  elif part == 'head':
    fn = functools.partial(_scale_loop_head, split=split, **kw)
  else:
    fn = functools.partial(_scale_loop, first=split, decode_batch=decode_batch, **kw)
  return jax.jit(fn, compiler_options=dict(compiler_options() + xla_options) or None)


@dataclasses.dataclass(frozen=True)
class CompiledSampler:
  """The sampling loop compiled for one batch size and one set of static options.

  `executable` is the jax.stages.Compiled that `__call__` runs: its `memory_analysis()` and
  `cost_analysis()` describe exactly the program being timed.
  """
  executable: jax.stages.Compiled  # the whole loop, or a split sampler's scales before `split`
  num_classes: int
  batch_size: int
  top_k: int
  use_cfg: bool
  tail: jax.stages.Compiled | None = None  # a split sampler's later scales and the decode

  @property
  def programs(self) -> tuple:
    """The executables one call runs, in order."""
    return (self.executable,) if self.tail is None else (self.executable, self.tail)

  def memory_analysis(self):
    """XLA's memory analysis of the program (of a split sampler: the larger of its two)."""
    analyses = [p.memory_analysis() for p in self.programs]
    if None in analyses:
      return None
    peak = lambda m: (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                      - m.alias_size_in_bytes)
    return max(analyses, key=peak)

  def __call__(self, t_params, v_params, *, key, labels, cfg: float = 1.5,
               top_p: float = 1.0) -> SampleOutput:
    """Samples len(labels) == batch_size images; `key` as in `sample` (same key, same images)."""
    validate_sampling_args(num_classes=self.num_classes, labels=labels, cfg=cfg,
                           top_k=self.top_k, top_p=top_p)
    labels = np.asarray(labels, np.int32)
    if labels.shape != (self.batch_size,):
      raise ValueError(f'labels must have shape ({self.batch_size},) for this compiled sampler, '
                       f'got {labels.shape}')
    _check_guidance(cfg, self.use_cfg)
    # numpy scalars and arrays go to the executable as they are: jnp conversions would each
    # compile a small program in a fresh process before the sampler's first call.
    args = (_variables(t_params), v_params, labels, key, np.float32(cfg), np.float32(top_p))
    if self.tail is None:
      ids, images = self.executable(*args)
    else:
      ids, carry = self.executable(*args)
      later_ids, images = self.tail(*args, carry)
      ids = list(ids) + list(later_ids)
    return SampleOutput(ids=ids, images_BHW3=images, labels_B=jax.device_put(labels))


def _check_guidance(cfg, use_cfg: bool) -> None:
  """A compiled sampler serves guided (cfg != 1) or unguided calls, not both."""
  if bool(cfg != 1.0) != use_cfg:
    raise ValueError(f'cfg={cfg}: this sampler was compiled '
                     + ('with guidance (cfg != 1)' if use_cfg else 'without guidance (cfg == 1)'))


def _signature(tree) -> tuple:
  """Hashable structure, shapes, dtypes and placements of a tree of arrays or ShapeDtypeStructs.

  The placement is part of it: params put on device 1 (e.g. a caller with one thread per device)
  need an executable compiled for device 1, as jit would retrace for them. Plain tuples, not
  ShapeDtypeStructs: `sample` computes this on every call (~500 leaves at d16), and building
  and hashing the structs was ~1.5 ms of host time per call before the device started.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((x.shape, x.dtype, getattr(x, 'sharding', None)) for x in leaves)


def _abstract(sig):
  """The ShapeDtypeStruct tree of a `_signature`."""
  treedef, leaves = sig
  return treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                            for shape, dtype, sharding in leaves])


@functools.lru_cache(maxsize=64)
def _sampler(transformer, vqvae, batch_size: int, top_k: int, more_smooth: bool, use_cfg: bool,
             decode_batch: int, t_sig, v_sig, key_aval, loop_blocks: bool,
             xla_options: tuple = (), split: int = 0,
             tail_xla_options: tuple = ()) -> CompiledSampler:
  """One CompiledSampler per process and signature, kept on disk across processes
  (compilation_cache.load_or_compile: a new process skips tracing and lowering)."""
  sds = jax.ShapeDtypeStruct
  args = (_abstract(t_sig), _abstract(v_sig), sds((batch_size,), jnp.int32), key_aval,
          sds((), jnp.float32), sds((), jnp.float32))
  devices = {d for _, _, sharding in (*t_sig[1], *v_sig[1]) if sharding is not None
             for d in sharding.device_set}
  static = (transformer, vqvae, batch_size, top_k, more_smooth, use_cfg, decode_batch,
            loop_blocks)

  def build(part: str, options: tuple, *extra):
    fn = _compiled(*static, options, part, split)
    lower = lambda: fn.lower(*args, *extra)
    if len(devices) > 1:
      # Params sharded over a mesh (the trainer's preview grid, possibly across processes): an
      # executable of several devices is compiled here and kept in memory only; reloading one
      # from disk would place it on this process's devices alone.
      return lower().compile()
    name = 'sampling._scale_loop' + ('' if part == 'all' else f'_{part}')
    key = compilation_cache.executable_key(
        name, repr(transformer.config), repr(vqvae.config), batch_size, top_k, more_smooth,
        use_cfg, decode_batch, str(t_sig), str(v_sig), str(key_aval), compiler_options(),
        loop_blocks, options, *((split,) if split else ()))
    return compilation_cache.load_or_compile(key, lower)

  meta = (transformer.config.num_classes, batch_size, top_k, use_cfg)
  if not split:
    return CompiledSampler(build('all', xla_options), *meta)
  head = build('head', xla_options)
  # The carry's shapes from the head's executable, not `jax.eval_shape`: that would trace the
  # head in every new process (7.6 s at d16) where the executable came from the cache.
  carry = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                 head.out_info[1])
  return CompiledSampler(head, *meta, tail=build('tail', tail_xla_options, carry))


def compile_sampler(transformer, t_params, vqvae, v_params, *, batch_size: int,
                    cfg: float = 1.5, top_k: int = 0, more_smooth: bool = False,
                    decode_batch: int = DEFAULT_DECODE_BATCH, key=None,
                    loop_blocks: bool | None = None,
                    xla_options: dict | None = None, split_at_scale: int | None = None,
                    late_xla_options: dict | None = None) -> CompiledSampler:
  """Lowers and compiles the sampling loop now (or loads it from the compilation cache).

  t_params / v_params: arrays or jax.ShapeDtypeStruct trees of the same structure (nothing
  is allocated: `compile_sampler(...).memory_analysis()` works for any size on any machine).
  Only whether cfg == 1 matters here; its value and top_p are given at call time. key: a key
  of the kind you will sample with (default: jax.random.key's). loop_blocks: run each scale's
  blocks as a loop (None: `loops_blocks()`, the backend's default); same samples either way.
  xla_options: XLA debug options for this program on top of `compiler_options()`, which
  they override (e.g. {'xla_gpu_enable_triton_gemm': True}, XLA's own default); part of the
  cache key, unlike XLA_FLAGS per call.
  split_at_scale: compile two programs instead of one, the scales before it with
  `xla_options` and the rest, with the decode, with `late_xla_options` (XLA options hold for
  a whole program; e.g. the large scales without Triton GEMMs, for cuBLAS's GELU epilogue,
  and the small ones with). Same samples: the second program continues from the first's
  f_hat and teacher input. On CPU, with none of these three given, the sampler is split
  where `cpu_split` says (YNNPACK matmuls for the scales with many rows).
  """
  validate_sampling_args(num_classes=transformer.config.num_classes, labels=None, cfg=cfg,
                         top_k=top_k, top_p=1.0)
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f'batch_size must be an integer >= 1, got {batch_size}')
  _check_decode_batch(decode_batch)
  k_scales = transformer.config.layout.num_scales
  if split_at_scale is not None and (int(split_at_scale) != split_at_scale
                                     or not 1 <= split_at_scale < k_scales):
    raise ValueError(f'split_at_scale must be an integer in [1, {k_scales - 1}] (the scales '
                     f'after it form the second program), got {split_at_scale}')
  if late_xla_options is not None and split_at_scale is None:
    raise ValueError('late_xla_options applies to the second program: give split_at_scale too')
  if (jax.default_backend() == 'cpu' and split_at_scale is None and xla_options is None
      and late_xla_options is None):
    split_at_scale, large = cpu_split(transformer.config.layout, int(batch_size), cfg != 1.0)
    if split_at_scale is None:
      xla_options = large or None
    else:
      late_xla_options = large
  key = jax.eval_shape(lambda: jax.random.key(0)) if key is None else key
  options = lambda d: tuple(sorted((d or {}).items()))
  return _sampler(transformer, vqvae, int(batch_size), int(top_k), bool(more_smooth),
                  bool(cfg != 1.0), int(decode_batch), _signature(_variables(t_params)),
                  _signature(v_params), jax.ShapeDtypeStruct(key.shape, key.dtype),
                  loops_blocks() if loop_blocks is None else bool(loop_blocks),
                  options(xla_options), int(split_at_scale or 0),
                  options(late_xla_options if late_xla_options is not None else xla_options))


# ----------------------------------------------------------------------------- many chunks

CHUNK_AXIS = 'chunks'


@dataclasses.dataclass(frozen=True)
class ChunkSampler:
  """The sampling loop for D chunks at once, chunk d on devices[d]: one SPMD program.

  Per device it computes what `sample` computes for one chunk (the same numbers: sample
  mode's images do not depend on the number of devices), but a host with D devices
  compiles it once instead of D times.
  """
  executable: jax.stages.Compiled
  mesh: jax.sharding.Mesh  # 1-D over `devices`, axis CHUNK_AXIS
  num_classes: int
  chunk_size: int  # b: images per chunk
  top_k: int
  use_cfg: bool

  @property
  def num_chunks(self) -> int:
    return self.mesh.size

  def replicate(self, tree):
    """Parameters on every device of the mesh, as the executable takes them (put them once)."""
    return jax.device_put(tree, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

  def __call__(self, t_params, v_params, *, keys, labels, cfg: float = 1.5, top_p: float = 1.0):
    """keys (D,) sampler keys, labels (D, b) -> (ids: per scale (D, b, pn*pn) int32, images
    (D, b, H, W, 3) float32 in [0, 1]); params from `replicate`. Returns without waiting."""
    labels = np.asarray(labels, np.int32)
    want = (self.num_chunks, self.chunk_size)
    if labels.shape != want:
      raise ValueError(f'labels must have shape {want} for this chunk sampler, got {labels.shape}')
    validate_sampling_args(num_classes=self.num_classes, labels=labels.reshape(-1), cfg=cfg,
                           top_k=self.top_k, top_p=top_p)
    _check_guidance(cfg, self.use_cfg)
    keys = jax.device_put(keys, jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(CHUNK_AXIS)))
    return self.executable(_variables(t_params), v_params, labels, keys, np.float32(cfg),
                           np.float32(top_p))


@functools.lru_cache(maxsize=16)
def _chunk_sampler(transformer, vqvae, device_ids: tuple, chunk_size: int, top_k: int,
                   more_smooth: bool, use_cfg: bool, decode_batch: int, t_sig, v_sig, key_aval,
                   loop_blocks: bool) -> ChunkSampler:
  P = jax.sharding.PartitionSpec
  by_id = {d.id: d for d in jax.local_devices()}
  mesh = jax.sharding.Mesh(np.array([by_id[i] for i in device_ids]), (CHUNK_AXIS,))
  replicated = jax.sharding.NamedSharding(mesh, P())
  split = jax.sharding.NamedSharding(mesh, P(CHUNK_AXIS))
  body = functools.partial(_scale_loop, transformer=transformer, vqvae=vqvae, top_k=top_k,
                           more_smooth=more_smooth, use_cfg=use_cfg, loop_blocks=loop_blocks,
                           decode_batch=decode_batch)

  def per_device(t_params, v_params, labels_1B, keys_1, cfg, top_p):
    # Device d runs the one-chunk program on its chunk as written (no vmap for XLA's
    # partitioner to rewrite), so its numbers are those of `sample` for that chunk.
    out = body(t_params, v_params, labels_1B[0], keys_1[0], cfg, top_p)
    return jax.tree_util.tree_map(lambda x: x[None], out)

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, check_vma=False,
                             in_specs=(P(), P(), P(CHUNK_AXIS), P(CHUNK_AXIS), P(), P()),
                             out_specs=P(CHUNK_AXIS)),
               in_shardings=(replicated, replicated, split, split, replicated, replicated),
               out_shardings=split, compiler_options=dict(compiler_options()) or None)
  d, sds = len(device_ids), jax.ShapeDtypeStruct
  on = lambda sig, sharding: jax.tree_util.tree_map(
      lambda x: sds(x.shape, x.dtype, sharding=sharding), _abstract(sig))
  args = (on(t_sig, replicated), on(v_sig, replicated),
          sds((d, chunk_size), jnp.int32, sharding=split),
          sds((d, *key_aval.shape), key_aval.dtype, sharding=split),
          sds((), jnp.float32), sds((), jnp.float32))
  # This process's devices only, so the stored executable loads back onto the same ones.
  key = compilation_cache.executable_key(
      'sampling.chunks', repr(transformer.config), repr(vqvae.config), device_ids, chunk_size,
      top_k, more_smooth, use_cfg, decode_batch, str(t_sig), str(v_sig), str(key_aval),
      compiler_options(), loop_blocks)
  executable = compilation_cache.load_or_compile(key, lambda: fn.lower(*args))
  return ChunkSampler(executable, mesh, transformer.config.num_classes, chunk_size, top_k,
                      use_cfg)


def compile_chunk_sampler(transformer, t_params, vqvae, v_params, *, devices, chunk_size: int,
                          cfg: float = 1.5, top_k: int = 0, more_smooth: bool = False,
                          decode_batch: int = DEFAULT_DECODE_BATCH,
                          loop_blocks: bool | None = None) -> ChunkSampler:
  """A `ChunkSampler` for len(devices) chunks of `chunk_size` images (this process's devices;
  params as arrays or ShapeDtypeStructs). Options as in `compile_sampler`."""
  validate_sampling_args(num_classes=transformer.config.num_classes, labels=None, cfg=cfg,
                         top_k=top_k, top_p=1.0)
  if int(chunk_size) != chunk_size or chunk_size < 1:
    raise ValueError(f'chunk_size must be an integer >= 1, got {chunk_size}')
  _check_decode_batch(decode_batch)
  local = {d.id for d in jax.local_devices()}
  if not devices or any(d.id not in local for d in devices):
    raise ValueError('devices must be a non-empty list of this process\'s devices')
  strip = lambda sig: (sig[0], tuple((shape, dtype, None) for shape, dtype, _ in sig[1]))
  key_aval = jax.eval_shape(lambda: jax.random.key(0))
  return _chunk_sampler(transformer, vqvae, tuple(d.id for d in devices), int(chunk_size),
                        int(top_k), bool(more_smooth), bool(cfg != 1.0), int(decode_batch),
                        strip(_signature(_variables(t_params))), strip(_signature(v_params)),
                        jax.ShapeDtypeStruct(key_aval.shape, key_aval.dtype),
                        loops_blocks() if loop_blocks is None else bool(loop_blocks))


def _check_decode_batch(decode_batch) -> None:
  if int(decode_batch) != decode_batch or decode_batch < 0:
    raise ValueError(f'decode_batch must be an integer >= 0 (0: all at once), got {decode_batch}')


def inference_params(params, dtype='bfloat16'):
  """A copy of the transformer params in `dtype` for sampling (half the argument memory).

  Pair it with TransformerConfig(dtype='bfloat16'): the blocks then use the weights as
  they are; fp32 parts (embeddings, the head) upcast them on the fly.
  """
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)


def sample(transformer, t_params, vqvae, v_params, *, key, labels=None, batch_size=None,
           cfg: float = 1.5, top_k: int = 0, top_p: float = 1.0,
           more_smooth: bool = False, decode_batch: int = DEFAULT_DECODE_BATCH,
           loop_blocks: bool | None = None) -> SampleOutput:
  """Samples images; `labels` (B,) or None for uniformly random labels (then batch_size).

  decode_batch: images per VQ-VAE decoder call (0: the whole batch at once; see
  `decode_in_chunks`). loop_blocks: as in `compile_sampler` (None: the backend's default).
  """
  num_classes = transformer.config.num_classes
  validate_sampling_args(num_classes=num_classes, labels=labels, cfg=cfg, top_k=top_k, top_p=top_p)
  if labels is None:
    if not batch_size or batch_size < 1:
      raise ValueError(f'give labels or batch_size >= 1, got batch_size={batch_size}')
    labels = jax.random.randint(jax.random.split(key)[0], (batch_size,), 0, num_classes)
  labels = np.asarray(labels, np.int32)
  sampler = compile_sampler(transformer, t_params, vqvae, v_params, batch_size=labels.shape[0],
                            cfg=cfg, top_k=top_k, more_smooth=more_smooth,
                            decode_batch=decode_batch, key=key, loop_blocks=loop_blocks)
  return sampler(t_params, v_params, key=key, labels=labels, cfg=cfg, top_p=top_p)
