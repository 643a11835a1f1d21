"""Run by tests/test_multiprocess.py under launch/local_multiprocess.py: each real JAX process
writes what the token-cache and image-folder sources give it.

    python tests/helpers/read_my_share.py <token data_dir> <folder data_dir> <out dir>
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mvar_jax import sharding  # noqa: E402


def main(tokens_dir, folder_dir, out_dir):
  sharding.initialize_distributed()
  import jax
  import numpy as np
  from mvar_jax.data import pipeline

  def read(name, data_dir, key, num_classes):
    cfg = pipeline.default_data_config()
    cfg.name, cfg.data_dir, cfg.num_classes, cfg.image_size = name, data_dir, num_classes, 32
    it = pipeline.create_dataset(cfg, split='train', batch_size=2 * jax.process_count(),
                                 shuffle=True, repeat=False, drop_remainder=False)
    return np.concatenate([b[key].reshape(len(b[key]), -1) for b in it])

  np.savez(os.path.join(out_dir, f'p{jax.process_index()}.npz'),
           ids=read('tokens', tokens_dir, 'ids', 10),
           images=read('folder', folder_dir, 'image', 2),
           process_count=jax.process_count())


if __name__ == '__main__':
  main(*sys.argv[1:])
