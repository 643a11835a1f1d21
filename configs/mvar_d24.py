"""python main.py --config=configs/mvar_d24.py --workdir=$WORKDIR \
    --config.tokenizer.checkpoint=weights/vqvae

MVAR-d24 on ImageNet 256x256 from scratch (no MVAR from-scratch recipe
is published; VAR-d24's batch 768, 350 epochs, tblr 8e-5).

`arg`: `finetune` starts from a converted VAR-d24 checkpoint (MVAR README: batch 448, 80 epochs);
`runlocal` shrinks everything for a laptop run.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, finetune=False)
  config = common.get_config()
  config.model.depth = 24  # width 1536, 24 heads, drop path 0.1
  if args.finetune:  # MVAR README: batch 448, 80 epochs
    config.init_from = 'weights/var_d24'  # converted VAR-d24 (mvar_jax.convert)
    config.train.batch_size = 448  # global batch
    config.train.epochs = 80.0  # run length
    config.train.tblr = 0.0001  # peak lr = tblr * batch / 256
    config.model.init_adaln_gamma = 0.001  # alng
    config.train.lr_end = 0.1  # wpe: final lr factor
    config.sample.cfg = 1.4  # recommended guidance
    config.sample.top_p = 0.96  # recommended nucleus
    config.sample.top_k = 900  # recommended top-k
  else:  # no MVAR from-scratch recipe is published: VAR-d24's batch 768, 350 epochs, tblr 8e-5
    config.train.batch_size = 768  # global batch
    config.train.epochs = 350.0  # run length
    config.train.tblr = 8e-05  # peak lr = tblr * batch / 256
    config.model.init_adaln_gamma = 0.0001  # alng
    config.train.lr_end = 0.01  # wpe: final lr factor
    config.sample.cfg = 1.4  # recommended guidance
    config.sample.top_p = 0.96  # recommended nucleus
    config.sample.top_k = 900  # recommended top-k
  config.mesh.fsdp = 8  # shard weights and Adam state over 8 devices (1B params)
  config.mesh.data = -1  # the remaining devices split the batch
  if args.runlocal:
    common.shrink(config)
  return config
