"""python -m mvar_jax.convert --transformer var_d20.pth --out weights/var_d20
python main.py --config=configs/mvar_d20_finetune.py --workdir=$WORKDIR \
    --config.tokenizer.checkpoint=weights/vqvae --config.init_from=weights/var_d20

MVAR-d20 fine-tuned from VAR-d20 (MVAR README: batch 192, 80 epochs).

Same as `configs/mvar_d20.py:finetune`; `arg` takes `runlocal`.
"""

from configs import mvar_d20


def get_config(arg=None):
  return mvar_d20.get_config(','.join(a for a in ('finetune', arg) if a))
