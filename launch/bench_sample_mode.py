"""Sample-mode throughput: images/s per device for the demo-size model (random weights).

    python launch/bench_sample_mode.py --devices=1,2 --num_images=400   # CPU: JAX_NUM_CPU_DEVICES
    python launch/bench_sample_mode.py --config=configs/mvar_d16.py --batch_size=64 --num_images=2048

Runs `mvar_jax.sample_mode.run` (shards, npz and all) into a temporary directory three times per
device count: the first run compiles (one executable per host), the second is timed steady
state, the third samples twice the images. Prints one table row per device count, with the
rate of the third run's extra images: a long job's rate, without the start-up every run pays.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'demo.py'))
  parser.add_argument('--devices', default='1', help='comma-separated device counts to try')
  parser.add_argument('--num_images', type=int, default=400)
  parser.add_argument('--batch_size', type=int, default=0, help='0: the config\'s sample.batch_size')
  parser.add_argument('--param_dtype', default='', help="sample.param_dtype ('': as stored)")
  args = parser.parse_args()
  counts = [int(d) for d in args.devices.split(',')]
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', str(max(counts)))

  import flax.linen as nn
  import jax
  import numpy as np
  from mvar_jax import config_utils, convert, sample_mode
  from mvar_jax import transformer as tfm
  from mvar_jax import vqvae as vq

  spec = importlib.util.spec_from_file_location('bench_config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  t = config.tokenizer
  tmp = tempfile.mkdtemp()
  rng = np.random.default_rng(0)

  def random_like(tree, scale):
    return jax.tree_util.tree_map(
        lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), tree)

  vcfg = vq.VQVAEConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                           for k, v in t.to_dict().items()
                           if k in vq.VQVAEConfig.__dataclass_fields__})
  vshapes = jax.eval_shape(lambda: nn.unbox(vq.init_params(vcfg, jax.random.key(0))['params']))
  convert.save_converted(tmp, 'vqvae', vcfg, random_like(vshapes, 0.3))
  tcfg = config_utils.transformer_config_from(config)
  tshapes = jax.eval_shape(lambda: nn.unbox(tfm.init_params(tcfg, jax.random.key(0))['params']))
  convert.save_converted(tmp, 'transformer', tcfg, random_like(tshapes, 0.05))
  config.tokenizer.checkpoint = config.sample.checkpoint = tmp
  config.sample.num_images = args.num_images
  if args.batch_size:
    config.sample.batch_size = args.batch_size
  config.sample.param_dtype = args.param_dtype

  print(f'{"devices":>7} {"images":>7} {"batch":>5} {"compile+run s":>13} {"steady s":>9} '
        f'{"2x images s":>11} {"img/s/device":>12} {"extra img/s/dev":>15}   '
        f'({jax.devices()[0].platform}, jax {jax.__version__})')
  n_img = args.num_images
  for n in counts:
    times = []
    # A first job (compiles), the same job again, then one of twice the images: the second
    # pays the same start-up (weights, executable from the cache, npz), so the difference
    # is the rate of a long job's sampling loop.
    for attempt, num in enumerate((n_img, n_img, 2 * n_img)):
      config.sample.output_dir = os.path.join(tmp, f'out_{n}_{attempt}')
      config.sample.num_images = num
      start = time.time()
      sample_mode.run(config, tmp, devices=jax.local_devices()[:n])
      times.append(time.time() - start)
    rate = n_img / times[1] / n
    extra = n_img / max(times[2] - times[1], 1e-9) / n
    print(f'{n:>7} {n_img:>7} {config.sample.batch_size:>5} {times[0]:>13.1f} '
          f'{times[1]:>9.1f} {times[2]:>11.1f} {rate:>12.2f} {extra:>15.2f}')


if __name__ == '__main__':
  main()
