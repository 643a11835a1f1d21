"""Trains VAR's multi-scale VQ-VAE (the released architecture by default) on your images.

    python main.py --config=configs/tokenizer.py --workdir=workdirs/vqvae \
        --config.data.name=folder --config.data.data_dir=/data/my_images

The result lands in <workdir>/tokenizer/vqvae.{msgpack,json}: point
`--config.tokenizer.checkpoint` of an MVAR config there. `arg`: `small` trains the
demo-size tokenizer (32 px, 8x8 latent) on the built-in shapes instead.
The official repositories publish weights but no tokenizer recipe: the optimiser
settings here are ours (L1 + L2 + VQ loss, AdamW, cosine decay), without the
perceptual and GAN losses of the released VAE.
"""

from configs import common
from mvar_jax import train_tokenizer
from mvar_jax.layout import DEFAULT_PATCH_NUMS


def get_config(arg=None):
  args = common.parse_arg(arg, small=False)
  config = common.get_config()
  config.tokenizer_only = True  # main.py trains the tokenizer alone
  config.data.name = 'imagenet2012'  # or 'folder' with data.data_dir
  config.data.image_size = 256  # pixels
  config.data.num_classes = 1000  # labels are not used by the tokenizer

  t = config.tokenizer
  t.update(train_tokenizer.default_tokenizer_train_config())
  t.ch = 160  # base width (vae_ch160v4096z32)
  t.ch_mult = (1, 1, 2, 2, 4)  # four downsamplings: 256 px -> 16x16
  t.num_res_blocks = 2  # res blocks per encoder level
  t.z_channels = 32  # code width
  t.vocab_size = 4096  # codebook entries
  t.patch_nums = DEFAULT_PATCH_NUMS  # token pyramid
  t.num_phi = 4  # shared Phi convs
  t.steps = 200_000  # optimizer steps
  t.batch_size = 256  # global batch
  t.lr = 2e-4  # peak learning rate
  t.warmup_steps = 2000  # warm-up steps
  t.log_every = 500  # steps between logged metrics
  t.precision = 'default'  # accelerator matmul precision for convs

  if args.small:
    config.data.name = 'builtin'
    config.data.image_size = 32
    config.data.num_classes = 10
    t.ch, t.ch_mult, t.num_res_blocks, t.z_channels = 32, (1, 2, 2), 1, 16
    t.vocab_size, t.patch_nums = 256, (1, 2, 3, 4, 6, 8)
    t.using_sa = t.using_mid_sa = False
    t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every = 300, 32, 2e-3, 100, 50
    t.precision = 'highest'
  return config
