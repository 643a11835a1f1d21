"""python main.py --config=configs/mvar_d30.py --workdir=$WORKDIR \
    --config.tokenizer.checkpoint=weights/vqvae

MVAR-d30 on ImageNet 256x256 from scratch (no MVAR recipe is published; VAR-d30's
batch 1024, 350 epochs, tblr 8e-5, twde 0.08). Weights and Adam state are sharded over all
devices (fsdp) and blocks are rematerialised.

`arg`: `runlocal` shrinks everything for a laptop run.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, finetune=False)
  config = common.get_config()
  config.model.depth = 30  # width 1920, 30 heads, drop path 0.125
  if args.finetune:
    raise ValueError('finetune: no VAR-d30 fine-tuning recipe is published; drop the arg')
  config.train.batch_size = 1024  # global batch
  config.train.epochs = 350.0  # run length
  config.train.tblr = 8e-05  # peak lr = tblr * batch / 256
  config.model.init_adaln_gamma = 1e-05  # alng
  config.train.lr_end = 0.01  # wpe: final lr factor
  config.train.weight_decay_end = 0.08  # twde: wd cosine-annealed 0.05 -> 0.08
  config.sample.cfg = 1.5  # recommended guidance
  config.sample.top_p = 0.96  # recommended nucleus
  config.sample.top_k = 900  # recommended top-k
  config.mesh.fsdp = -1  # 2B params: shard weights and Adam state over all devices
  config.mesh.data = 1  # the batch is split over fsdp too
  config.model.remat = True  # recompute blocks in the backward pass (activation memory)
  if args.runlocal:
    common.shrink(config)
  return config
