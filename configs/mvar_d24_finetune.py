"""python -m mvar_jax.convert --transformer var_d24.pth --out weights/var_d24
python main.py --config=configs/mvar_d24_finetune.py --workdir=$WORKDIR \
    --config.tokenizer.checkpoint=weights/vqvae --config.init_from=weights/var_d24

MVAR-d24 fine-tuned from VAR-d24 (MVAR README: batch 448, 80 epochs).

Same as `configs/mvar_d24.py:finetune`; `arg` takes `runlocal`.
"""

from configs import mvar_d24


def get_config(arg=None):
  return mvar_d24.get_config(','.join(a for a in ('finetune', arg) if a))
