"""python -m mvar_jax.convert --transformer var_d16.pth --out weights/var_d16
python main.py --config=configs/mvar_d16_finetune.py --workdir=$WORKDIR \
    --config.tokenizer.checkpoint=weights/vqvae --config.init_from=weights/var_d16

MVAR-d16 fine-tuned from VAR-d16 (MVAR README: batch 448, 80 epochs).

Same as `configs/mvar_d16.py:finetune`; `arg` takes `runlocal`.
"""

from configs import mvar_d16


def get_config(arg=None):
  return mvar_d16.get_config(','.join(a for a in ('finetune', arg) if a))
