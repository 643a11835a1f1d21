"""python main.py --config=configs/common.py:runlocal --workdir=/tmp/mvar \
    --config.tokenizer.checkpoint=weights/vqvae

Shared defaults of every run config (d16, the official optimiser, ImageNet 256); the model
files override what differs, and common.py alone is only for smoke tests. `arg` is a
comma-separated list of switches and key=value pairs (`runlocal`, `finetune`,
`runlocal,finetune`); `runlocal` shrinks everything for a laptop run: a 2-block model on
the built-in shapes at 256 px with the real tokenizer.
"""

from __future__ import annotations

import ml_collections

from mvar_jax.data import pipeline
from mvar_jax.layout import DEFAULT_PATCH_NUMS


def parse_arg(arg: str | None, **defaults):
  """'runlocal,depth=20' -> ConfigDict(runlocal=True, depth=20, ...) over `defaults`."""
  out = dict(defaults)
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition('=')
    if key not in out:
      raise ValueError(f'unknown config arg {key!r}; known: {tuple(out)}')
    if not value:
      out[key] = True
    else:
      kind = type(out[key])
      out[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
  return ml_collections.ConfigDict(out)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base config (d16, official optimiser); model files start from it."""
  args = parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds init, data order, dropout and sampling (all reproducible from it)

  # Data: the pipeline owns these fields (mvar_jax/data/pipeline.py); ImageNet 256 as upstream.
  config.data = pipeline.default_data_config()
  config.data.name = 'imagenet2012'  # TFDS ImageNet; 'tokens' for a token cache (faster)
  config.data.image_size = 256  # ADM centre crop side (the tokenizer's resolution)
  config.data.num_classes = 1000  # ImageNet classes

  # Tokenizer (frozen VQ-VAE): only its quantiser is used when the data are token ids.
  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.checkpoint = ''  # converted VQ-VAE dir (vqvae.msgpack + vqvae.json)

  # Transformer: fields of mvar_jax.transformer.TransformerConfig (see config_utils).
  config.model = ml_collections.ConfigDict()
  config.model.depth = 16  # AdaLN blocks; heads = depth and width = 64 * depth by default
  config.model.width = -1  # token width C; <= 0 means 64 * depth
  config.model.num_heads = -1  # attention heads; <= 0 means depth (head dim 64)
  config.model.mlp_ratio = 4.0  # FFN hidden width / C
  config.model.num_classes = 1000  # class ids 0..num_classes-1 (num_classes = the CFG null class)
  config.model.vocab_size = 4096  # tokenizer codebook size (must match the tokenizer)
  config.model.cvae = 32  # tokenizer code width (must match the tokenizer)
  config.model.patch_nums = DEFAULT_PATCH_NUMS  # side of each scale's token map (256 px)
  config.model.attention_mode = 'mvar'  # 'mvar' (scale/spatial-Markov) or 'var' (block-causal)
  config.model.refine_step = 8  # first scale with neighbourhood attention (13x13 and 16x16)
  config.model.kernel_size = 7  # neighbourhood attention window
  config.model.attention_implementation = 'auto'  # neighbourhood op: auto | gather | dense | pallas
  config.model.attention_fused_qkv = True  # GPU inference: one kernel from the qkv projection
  config.model.ffn_implementation = 'auto'  # inference fc1 + GELU: auto (= xla) | xla | pallas
  config.model.drop_path_rate = -1.0  # max stochastic depth; < 0 means 0.1 * depth / 24
  config.model.cond_drop_rate = 0.1  # class dropout (trains the unconditional branch for CFG)
  config.model.dtype = 'bfloat16'  # compute dtype (params and optimiser state stay fp32)
  config.model.remat = False  # rematerialise blocks in the backward pass (memory for compute)
  # Materialise the residual stream's cotangent after each block: auto (on for CPU and GPU) |
  # on | off. Same gradients; stops XLA:CPU from recomputing the later blocks' chain in every
  # block's backward (2x faster d16 step on CPU).
  config.model.grad_boundaries = 'auto'
  # The dense layers' weight gradients as ordinary GEMMs on a transposed copy of the input:
  # auto (on for CPU) | on | off. Same gradients; XLA:CPU runs the transposed-operand dot
  # autodiff emits at ~60% of its GEMM rate.
  config.model.transposed_weight_grads = 'auto'
  config.model.init_adaln = 0.5  # init multiplier of the AdaLN scale/shift rows (aln)
  config.model.init_adaln_gamma = 1e-3  # init multiplier of AdaLN gamma rows (alng; README runs)
  config.model.init_head = 0.02  # init multiplier of the head weight (hd)

  config.init_from = ''  # converted transformer dir to start from (fine-tuning); '' = scratch

  # Mesh: 'data' replicates weights, 'fsdp' shards them on 'embed'; the batch is split over both.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # data-parallel size; -1 = the devices not used by the other axis
  config.mesh.fsdp = 1  # weight-sharding size (ZeRO-3); raise it when the model does not fit
  config.mesh.num_devices = -1  # use the first N devices; -1 = all (required on several hosts)
  config.mesh.rules = ()  # ((logical, mesh axes), ...); () = mvar_jax.sharding.DEFAULT_RULES

  config.train = ml_collections.ConfigDict()
  config.train.schedule = 'segments'  # 'segments' (official: small scales, then each large) | 'all'
  config.train.ratio_k = 8  # segments: small-scale iterations per cycle (then one per large scale)
  config.train.batch_size = 448  # global batch (every iteration draws its own batch)
  config.train.grad_accum_steps = 1  # > 1: each step's batch in this many sequential parts (memory)
  config.train.epochs = 300.0  # length of the run; an iteration is one optimiser step
  config.train.num_steps = -1  # > 0 overrides epochs * steps_per_epoch
  config.train.steps_per_epoch = -1  # <= 0: ceil(train examples / batch_size), as upstream
  config.train.tblr = 1e-4  # base lr; peak lr = tblr * batch_size / 256
  config.train.lr_schedule = 'lin0'  # warm-up, hold 5%, linear decay (utils/lr_control.py)
  config.train.warmup_epochs = -1.0  # linear warm-up length; < 0 means epochs / 50 (upstream)
  config.train.warmup_start = 0.005  # wp0: lr factor at step 0
  config.train.lr_end = 0.1  # wpe: lr factor at the last step
  config.train.weight_decay = 0.05  # AdamW decay (none on 1-D, biases, pos_*, lvl_embed, scale_mul)
  config.train.weight_decay_end = -1.0  # twde: cosine-annealed end value; < 0 keeps it constant
  config.train.b1 = 0.9  # AdamW beta1
  config.train.b2 = 0.95  # AdamW beta2
  config.train.eps = 1e-8  # AdamW epsilon (torch default)
  config.train.grad_clip = 2.0  # global grad-norm clip; 0 disables
  config.train.label_smoothing = 0.0  # CE label smoothing (official 0)
  config.train.ema_decay = 0.0  # EMA of params (0 = off; upstream MVAR keeps no EMA)
  config.train.log_every = 100  # steps between train metric writes (and the NaN check)
  config.train.checkpoint_every = 1000  # steps between checkpoints
  config.train.keep_checkpoints = 3  # checkpoints kept (older ones deleted)
  config.train.async_checkpointing = True  # write checkpoints in the background
  config.train.eval_every = 5000  # steps between validation passes; 0 = only at the end
  config.train.eval_batches = -1  # validation batches per pass; -1 = the whole split
  config.train.sample_every = 10000  # steps between sample grids in TensorBoard; 0 = never
  config.train.sample_images = 16  # images in a TensorBoard grid
  config.train.profile_steps = 5  # steps traced by the CLU profiler (first at step 10); 0 = off

  # Sampling (main.py --mode=sample and the TensorBoard grids).
  config.sample = ml_collections.ConfigDict()
  config.sample.checkpoint = ''  # converted dir to sample from; '' = latest checkpoint in --workdir
  config.sample.use_ema = True  # use the EMA params of a workdir checkpoint when it has them
  config.sample.cfg = 1.5  # classifier-free guidance strength (ramped over scales)
  config.sample.top_k = 900  # keep logits >= the k-th largest; 0 = off
  config.sample.top_p = 0.96  # nucleus threshold; 1 = off
  config.sample.more_smooth = False  # Gumbel-softmax code mixing (visualisation only, not for FID)
  config.sample.num_images = 50000  # images to sample (labels cycle 0..num_classes-1: 50 per class)
  config.sample.batch_size = 64  # images per sampling call
  # VQ-VAE decode dtype: '' = auto: model.dtype on GPU/TPU (bf16 takes the H200 decode of 32
  # images from 57 to 38 ms; the official sampler decodes under fp16 autocast), float32 on CPU.
  config.sample.decoder_dtype = ''
  # The transformer params while sampling: '' = as stored (fp32); 'bfloat16' = a bf16 copy
  # (half the argument memory, no per-call cast to the bf16 compute dtype), as
  # launch/bench_vs_official.py times ours on a GPU. Not the fp32 params' images exactly.
  config.sample.param_dtype = ''
  config.sample.output_dir = ''  # where samples.npz and the PNG grid go; '' = <workdir>/samples

  # Evaluation with the FID Inception network (mvar_jax/evaluation/evaluators.py): FID, sFID,
  # IS, precision and recall of samples during training and at its end. Off while inception=''.
  config.eval = ml_collections.ConfigDict()
  config.eval.inception = ''  # converted FID Inception dir or pytorch-fid's pt_inception-*.pth
  config.eval.reference = ''  # ADM reference batch or reference cache npz; '' = data's val split
  config.eval.reference_cache = ''  # cache of the val-split reference; '' = <workdir>/fid_reference.npz
  config.eval.reference_images = -1  # val images for a computed reference; -1 = the whole split
  config.eval.fid_every = 0  # steps between FID evaluations; 0 = only the final evaluation
  config.eval.fid_images = 5000  # samples per evaluation (balanced labels); 50000 for paper numbers
  config.eval.fid_batch_size = 64  # images per sampling call
  config.eval.inception_batch_size = 64  # images per device per Inception step
  config.eval.preprocess = 'adm'  # 'adm' (the ADM evaluator and its reference batches) | 'pytorch_fid'
  config.eval.precision = 'highest'  # Inception convolutions: 'highest' (fp32) | 'default' (TF32)

  if args.runlocal:
    shrink(config)
  return config


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`runlocal`: a tiny model, the built-in shapes at 256 px, a short run on any device count."""
  config.mesh.data, config.mesh.fsdp = -1, 1
  config.data.name = 'builtin'
  config.data.num_classes = 10
  config.data.builtin_train_size = 256
  config.data.builtin_val_size = 32
  config.model.depth = 2
  config.model.width = 64
  config.model.num_heads = 2
  config.model.dtype = 'float32'
  config.train.batch_size = 8
  config.train.epochs = 2.0
  config.train.num_steps = -1
  config.train.steps_per_epoch = 10
  config.train.warmup_epochs = 0.2
  config.train.log_every = 5
  config.train.checkpoint_every = 10
  config.train.eval_every = 10
  config.train.eval_batches = 2
  config.train.sample_every = 0
  config.train.profile_steps = 0
  config.sample.num_images = 16
  config.sample.batch_size = 8
  return config
