"""python main.py --config=configs/mvar_d36_512.py --workdir=$WORKDIR \
    --config.tokenizer.checkpoint=weights/var_d36_512 [--config.init_from=weights/var_d36_512]

MVAR-d36 at 512x512: VAR-d36's 512 px pyramid 1,2,3,4,6,9,13,18,24,32 (VAR's `pn=512`; the
same VQ-VAE, 16x down-sampling), width 2304, 36 heads. Convert the tokenizer and VAR-d36 with
that pyramid: `python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --transformer
var_d36.pth --patch_nums 1_2_3_4_6_9_13_18_24_32 --refine_step 6 --out weights/var_d36_512`.
No MVAR-512 recipe or checkpoint is published: the optimiser follows VAR-d36-512's
fine-tune-from-VAR use (MVAR README recipe: batch 448, 80 epochs).

Attention. At 256 px MVAR runs dense attention inside each of the 8 small maps (up to
10x10) and 7x7 neighbourhood attention on 13x13 and 16x16 (refine_step=8, kernel 7). The
rule kept here is the same in tokens: neighbourhood attention on every map of 13x13 and
larger, so refine_step=6 (13x13, 18x18, 24x24, 32x32 are neighbourhood maps; 1..9 dense),
with the same 7x7 window: spatial-Markov conditioning is a statement about a token's
neighbours, not about a fraction of the image, and a 7x7 window keeps the attention cost
linear in the tokens of a map (49 keys per query at 32x32, where dense would be 1024).
The official trainer's defaults (refine_step=8, kernel_size=7; utils/arg_util.py) do not
change with `pn=512`: they would leave 13x13 and 18x18 dense (169 and 324 tokens, cheap
either way); `--config.model.refine_step=8` reproduces that. launch/bench_memory.py --res=512
prints the memory this costs.

`arg`: `runlocal` shrinks everything for a laptop run.
"""

from configs import common

PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = common.get_config()
  config.data.image_size = 512  # ADM centre crop side (the tokenizer's resolution)
  config.model.patch_nums = PATCH_NUMS_512  # VAR's 512 px pyramid (2240 tokens)
  config.model.refine_step = 6  # neighbourhood attention from 13x13 on, as at 256 px
  config.model.kernel_size = 7  # the same window in tokens as at 256 px
  config.model.depth = 36  # width 2304, 36 heads, drop path 0.15
  config.init_from = 'weights/var_d36_512'  # converted VAR-d36-512 (mvar_jax.convert)
  config.train.batch_size = 448  # global batch (MVAR README fine-tune recipe)
  config.train.epochs = 80.0  # run length
  config.train.tblr = 0.0001  # peak lr = tblr * batch / 256
  config.model.init_adaln_gamma = 0.001  # alng
  config.train.lr_end = 0.1  # wpe: final lr factor
  config.sample.cfg = 1.5  # guidance (VAR-d36-512 demo value)
  config.sample.top_p = 0.96  # nucleus
  config.sample.top_k = 900  # top-k
  config.sample.batch_size = 16  # images per sampling call (512 px decodes are 4x larger)
  config.mesh.fsdp = -1  # 2.3B params: shard weights and Adam state over all devices
  config.mesh.data = 1  # the batch is split over fsdp too
  config.model.remat = True  # recompute blocks in the backward pass (2240-token sequences)
  if args.runlocal:
    common.shrink(config)
    config.data.image_size = 256
    config.model.patch_nums = common.DEFAULT_PATCH_NUMS
    config.model.refine_step = 8
    config.init_from = ''
  return config
