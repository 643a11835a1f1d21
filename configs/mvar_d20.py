"""python main.py --config=configs/mvar_d20.py --workdir=$WORKDIR \
    --config.tokenizer.checkpoint=weights/vqvae

MVAR-d20 on ImageNet 256x256 from scratch (no MVAR from-scratch recipe
is published; VAR-d20's batch 768, 250 epochs).

`arg`: `finetune` starts from a converted VAR-d20 checkpoint (MVAR README: batch 192, 80 epochs);
`runlocal` shrinks everything for a laptop run.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, finetune=False)
  config = common.get_config()
  config.model.depth = 20  # width 1280, 20 heads, drop path 0.08333
  # Shared by both recipes:
  config.train.tblr = 0.0001  # peak lr = tblr * batch / 256
  config.model.init_adaln_gamma = 0.001  # alng
  config.train.lr_end = 0.1  # wpe: final lr factor
  config.sample.cfg = 1.5  # recommended guidance
  config.sample.top_p = 0.96  # recommended nucleus
  config.sample.top_k = 900  # recommended top-k
  if args.finetune:  # MVAR README: batch 192, 80 epochs
    config.init_from = 'weights/var_d20'  # converted VAR-d20 (mvar_jax.convert)
    config.train.batch_size = 192  # global batch
    config.train.epochs = 80.0  # run length
  else:  # no MVAR from-scratch recipe is published: VAR-d20's batch 768, 250 epochs
    config.train.batch_size = 768  # global batch
    config.train.epochs = 250.0  # run length
  if args.runlocal:
    common.shrink(config)
  return config
