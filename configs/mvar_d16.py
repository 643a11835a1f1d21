"""python main.py --config=configs/mvar_d16.py --workdir=$WORKDIR \
    --config.tokenizer.checkpoint=weights/vqvae

MVAR-d16 on ImageNet 256x256 from scratch (MVAR README: batch 448, 300 epochs).

`arg`: `finetune` starts from a converted VAR-d16 checkpoint (MVAR README: batch 448, 80 epochs);
`runlocal` shrinks everything for a laptop run.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, finetune=False)
  config = common.get_config()
  config.model.depth = 16  # width 1024, 16 heads, drop path 0.06667
  # Shared by both recipes:
  config.train.tblr = 0.0001  # peak lr = tblr * batch / 256
  config.model.init_adaln_gamma = 0.001  # alng
  config.train.lr_end = 0.1  # wpe: final lr factor
  config.sample.top_p = 0.99  # recommended nucleus
  config.sample.top_k = 1200  # recommended top-k
  if args.finetune:  # MVAR README: batch 448, 80 epochs
    config.init_from = 'weights/var_d16'  # converted VAR-d16 (mvar_jax.convert)
    config.train.batch_size = 448  # global batch
    config.train.epochs = 80.0  # run length
    config.sample.cfg = 2.0  # recommended guidance
  else:  # MVAR README: batch 448, 300 epochs
    config.train.batch_size = 448  # global batch
    config.train.epochs = 300.0  # run length
    config.sample.cfg = 2.7  # recommended guidance
  if args.runlocal:
    common.shrink(config)
  return config
