"""The demo: a small tokenizer and a small MVAR on the built-in shapes dataset, on a CPU.

    python main.py --config=configs/demo.py --workdir=workdirs/demo

Trains a VQ-VAE (32 px -> 8x8 latent, 256 codes), caches the tokens, trains MVAR
(depth 4, width 128) on the pyramid 1,2,3,4,6,8 with both attention paths
(block-diagonal on scales 0-3, 3x3 neighbourhood attention on the 6x6 and 8x8 maps),
then samples every class and reports the class consistency (mvar_jax/demo.py).
`--config=configs/demo.py:quick` shrinks it to a one-minute smoke run.
"""

from __future__ import annotations

import ml_collections

from configs import common
from mvar_jax import train_tokenizer

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, quick=False)
  config = common.get_config()
  config.demo = True  # main.py runs mvar_jax.demo.run (all stages) instead of MVAR training alone

  config.data.name = 'builtin'  # generated shapes: 10 classes, no download
  config.data.image_size = 32  # pixels
  config.data.num_classes = 10  # built-in classes
  config.data.builtin_train_size = 10_000  # training images
  config.data.builtin_val_size = 500  # validation images

  t = config.tokenizer
  t.update(train_tokenizer.default_tokenizer_train_config())
  t.ch = 32  # base width of the VQ-VAE
  t.ch_mult = (1, 2, 2)  # two downsamplings: 32 px -> 8x8 latent
  t.num_res_blocks = 1  # res blocks per encoder level
  t.z_channels = 16  # code width (Cvae)
  t.vocab_size = 256  # codebook entries
  t.patch_nums = PATCH_NUMS  # token pyramid
  t.using_sa = False  # no attention blocks: convolutions suffice at 8x8
  t.using_mid_sa = False  # likewise in the middle
  t.steps = 300  # tokenizer optimizer steps
  t.batch_size = 32  # tokenizer batch
  t.lr = 2e-3  # tokenizer peak learning rate

  m = config.model
  m.depth = 4  # blocks
  m.width = 128  # token width
  m.num_heads = 4  # heads (head dim 32)
  m.num_classes = 10  # built-in classes
  m.vocab_size = t.vocab_size  # must equal the tokenizer's
  m.cvae = t.z_channels  # must equal the tokenizer's
  m.patch_nums = PATCH_NUMS  # must equal the tokenizer's
  m.refine_step = 4  # scales 4, 5 (6x6, 8x8) use neighbourhood attention
  m.kernel_size = 3  # neighbourhood window
  m.attention_implementation = 'auto'  # blocked on CPU (steps 15% faster than gather)
  m.drop_path_rate = 0.0  # no stochastic depth for a short run
  m.dtype = 'float32'  # CPUs are fastest in fp32
  m.init_adaln_gamma = 1e-3  # as the README runs

  tr = config.train
  tr.schedule = 'all'  # every step trains all scales (both attention paths each step)
  tr.batch_size = 64  # global batch
  tr.num_steps = 360  # optimizer steps
  tr.tblr = 4e-3  # peak lr = tblr * 64 / 256 = 1e-3
  tr.warmup_epochs = 0.3  # short warm-up
  tr.log_every = 50  # steps between logged metrics
  tr.checkpoint_every = 200  # steps between checkpoints
  tr.eval_every = 0  # validate once, at the end
  tr.eval_batches = 4  # validation batches
  tr.sample_every = 0  # the demo samples after training instead
  tr.profile_steps = 0  # no profiler trace
  tr.async_checkpointing = False  # a CPU run gains nothing from background writes

  s = config.sample
  s.cfg = 3.0  # guidance strength (ramped over scales)
  s.top_k = 64  # keep the 64 most likely codes
  s.top_p = 0.95  # nucleus
  s.batch_size = 100  # images per sampling call

  o = config.demo_opts = ml_collections.ConfigDict()
  o.samples_per_class = 20  # images sampled per class for the consistency figure
  o.classifier_steps = 300  # steps of the CNN that judges class consistency
  o.encode_batch = 250  # images per tokenizer call while caching tokens

  if args.quick:
    t.steps = 20
    t.eval_images = 0  # no held-out reconstruction metrics in a smoke run
    tr.num_steps = 10
    tr.checkpoint_every = 5
    tr.log_every = 5
    config.data.builtin_train_size = 512
    config.demo_opts.samples_per_class = 2
    config.demo_opts.classifier_steps = 50
  return config

