"""Trains VAR's multi-scale VQ-VAE (the released architecture by default) on your images.

    python -m mvar_jax.lpips --vgg16 vgg16-397923af.pth --out weights/   # once: LPIPS weights
    python main.py --config=configs/tokenizer.py --workdir=workdirs/vqvae \
        --config.data.name=folder --config.data.data_dir=/data/my_images \
        --config.tokenizer.lpips_weights=weights/lpips_vgg.msgpack
    python main.py --mode=eval_tokenizer --config=configs/tokenizer.py --workdir=workdirs/vqvae

The result lands in <workdir>/tokenizer/vqvae.{msgpack,json}: point
`--config.tokenizer.checkpoint` of an MVAR config there. `arg`: `small` trains the
demo-size tokenizer (32 px, 8x8 latent) on the built-in shapes instead, with the demo's
small and fast recipe (tokenizer_recipes.loss_fields('demo')), tuned for a random-trunk
LPIPS that needs no download:
    python -m mvar_jax.lpips --random_trunk_seed=0 --out weights/
    python main.py --config=configs/tokenizer.py:small --workdir=workdirs/vqvae_small \
        --config.tokenizer.lpips_weights=weights/lpips_vgg.msgpack
(with the calibrated ImageNet-VGG LPIPS, set --config.tokenizer.perceptual_weight=1). The GAN
starts at disc_start = 200, two thirds of the 300 steps: set it too when you change steps.

What you supply (nothing is downloaded):
  * torchvision's ImageNet VGG16 weights (`vgg16-397923af.pth`) for the perceptual loss;
    the LPIPS linear heads are read from the installed `lpips` wheel at conversion time.
    Convert them with `python -m mvar_jax.lpips` and pass `tokenizer.lpips_weights`.
    Without them the perceptual term is OFF (logged at start), whatever perceptual_weight.
  * for rFID in eval mode, pytorch-fid's Inception weights in `eval.inception`
    (configs/common.py); without them rFID is reported as off.

Loss weights: the official repositories publish VAR's tokenizer weights but no training
recipe; VAR's tokenizer follows the VQGAN family, so the weights below are LlamaGen's
(FoundationVision, VAR's authors' group; mirror FoundationVision/LlamaGen @ce98ec4):
  l2_weight 1.0, l1_weight 0 tokenizer/tokenizer_image/vq_train.py:289-290
                                (--reconstruction-weight 1.0, --reconstruction-loss 'l2')
  perceptual_weight 1.0         vq_train.py:291 (--perceptual-weight)
  disc_weight 0.5               vq_train.py:292 (--disc-weight)
  disc_start 20000              vq_train.py:293 (--disc-start)
  disc_adaptive False           tokenizer/tokenizer_image/vq_loss.py:51 (default
                                disc_adaptive_weight=False; vq_train.py:92-103 does not set it)
  disc_ndf 64, disc_layers 3    vq_loss.py:50-51 (disc_dim=64, disc_num_layers=3)
  disc Adam b1 0.9, b2 0.95     vq_train.py:111 with :305-306 (--beta1, --beta2)
  disc_lr 1e-4                  vq_train.py:111 with :303 (--lr, shared by both nets)
  commitment beta 0.25          vq_train.py:288 (--commit-loss-beta; VAR's beta too)
For comparison, taming-transformers (mirror CompVis/taming-transformers @3ba01b2):
L1 1.0 and perceptual 1.0 (taming/modules/losses/vqperceptual.py:35-37 defaults), disc_weight
0.8 and disc_start 250001 (configs/imagenet_vqgan.yaml:24-25), adaptive weight on
(vqperceptual.py:63-73, clamp 1e4); `tokenizer_recipes.loss_fields('taming')`.
Not taken from LlamaGen: its l2-normalised 8-dim codes (vq_train.py:284-285), because the
released VAR VQ-VAE quantises full 32-dim codes without normalisation and loads as is.
The generator's optimiser, schedule and batch here are ours (AdamW, cosine decay).
"""

from configs import common
from mvar_jax import tokenizer_recipes, train_tokenizer
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
  t.eval_every = 5000  # steps between held-out reconstruction metrics
  t.eval_images = 1000  # held-out images for them (and for eval mode)
  t.precision = 'default'  # accelerator matmul precision for convs
  t.update(tokenizer_recipes.loss_fields('llamagen'))  # sources: module docstring
  t.codebook_l2_norm, t.codebook_dim = False, 0  # VAR's quantizer (see the docstring)
  t.lpips_weights = ''  # lpips_vgg.msgpack from `python -m mvar_jax.lpips`; '': perceptual OFF

  if args.small:
    config.data.name = 'builtin'
    config.data.image_size = 32
    config.data.num_classes = 10
    t.ch, t.ch_mult, t.num_res_blocks, t.z_channels = 32, (1, 2, 2), 1, 16
    t.vocab_size, t.patch_nums = 256, (1, 2, 3, 4, 6, 8)
    t.using_sa = t.using_mid_sa = False
    t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every = 300, 32, 2e-3, 100, 50
    t.eval_every, t.eval_images = 0, 256
    t.precision = 'highest'
    t.update(tokenizer_recipes.loss_fields('demo', steps=t.steps))
  return config
