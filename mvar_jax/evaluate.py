"""FID, sFID, Inception Score, precision and recall of generated images, in JAX.

    python -m mvar_jax.evaluate --samples samples.npz \
        --reference VIRTUAL_imagenet256_labeled.npz --inception weights/inception

prints a table and writes `<samples>.eval.json` (or --out). `--inception` is a directory
written by `python -m mvar_jax.evaluation.inception` or pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` itself (then torch converts it on the fly).
`--reference` is ADM's reference batch or a cache written by `--reference_cache`; without it,
`--reference_data folder --reference_dir DIR` (DIR/val holds images) or
`--reference_data imagenet2012 --reference_dir TFDS_DIR` computes the statistics of a split
(cached to `--reference_cache` when given). Feature extraction runs on every device of every
process (`jax.distributed` is started as for training).

From Python:

    from mvar_jax import evaluate
    from mvar_jax.evaluation import features, inception, reference
    extractor = features.FeatureExtractor(inception.load_params('weights/inception'))
    ref = reference.load('VIRTUAL_imagenet256_labeled.npz', extractor)
    results = evaluate.evaluate_images(images_uint8_NHW3, ref, extractor)
    # {'fid', 'sfid', 'inception_score', 'precision', 'recall', 'num_images', 'num_reference'}
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from mvar_jax.evaluation import metrics

METRICS = ('fid', 'sfid', 'inception_score', 'precision', 'recall')


def evaluate_features(feats: dict[str, np.ndarray], ref, *, is_split_size: int = metrics.IS_SPLIT_SIZE,
                      pr_block: int = metrics.BLOCK) -> dict[str, float]:
  """The five metrics of sample features ({'pool', 'spatial', 'logits'}) against a Reference."""
  n = len(feats['pool'])
  if n < 2:
    raise ValueError(f'need at least 2 images for FID statistics, got {n}')
  precision, recall = metrics.precision_recall(ref.pool, feats['pool'], block=pr_block)
  return {
      'fid': metrics.frechet_distance_of_features(feats['pool'], ref.mu, ref.sigma),
      'sfid': metrics.frechet_distance_of_features(feats['spatial'], ref.mu_s, ref.sigma_s),
      'inception_score': metrics.inception_score(feats['logits'], split_size=is_split_size),
      'precision': precision,
      'recall': recall,
      'num_images': n,
      'num_reference': ref.num_images,
  }


def evaluate_images(images_NHW3, ref, extractor, *, progress: bool = True,
                    **kwargs) -> dict[str, float]:
  """Features of uint8 (or [0, 255] float) images, then `evaluate_features`."""
  if ref.preprocess != extractor.config.preprocess:
    raise ValueError(f'reference preprocess {ref.preprocess!r} != Inception preprocess '
                     f'{extractor.config.preprocess!r}')
  return evaluate_features(extractor.of_array(images_NHW3, progress=progress), ref, **kwargs)


def format_table(results: dict) -> str:
  rows = [('FID', 'fid', '.3f'), ('sFID', 'sfid', '.3f'), ('Inception Score', 'inception_score', '.3f'),
          ('Precision', 'precision', '.4f'), ('Recall', 'recall', '.4f'),
          ('images', 'num_images', 'd'), ('reference images', 'num_reference', 'd')]
  width = max(len(r[0]) for r in rows)
  lines = [f'{"metric":<{width}}  value', f'{"-" * width}  ----------']
  lines += [f'{name:<{width}}  {results[key]:{fmt}}' for name, key, fmt in rows if key in results]
  return '\n'.join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description='FID / sFID / IS / precision / recall of samples.npz.')
  p.add_argument('--samples', required=True, help='npz with arr_0: uint8 (N, H, W, 3) images')
  p.add_argument('--inception', required=True,
                 help='converted Inception dir or pytorch-fid pt_inception-2015-12-05-*.pth')
  p.add_argument('--reference', default='', help='ADM reference batch npz or a reference cache')
  p.add_argument('--reference_data', default='', choices=('', 'builtin', 'folder', 'imagenet2012'),
                 help='compute the reference from this dataset instead of --reference')
  p.add_argument('--reference_dir', default='', help='folder root (holds <split>/) or TFDS data_dir')
  p.add_argument('--reference_manual_dir', default='', help='imagenet2012: TFDS manual_dir')
  p.add_argument('--reference_split', default='val', help='split of --reference_data')
  p.add_argument('--reference_images', type=int, default=-1, help='-1 = the whole split')
  p.add_argument('--reference_cache', default='', help='npz to reuse / write the reference to')
  p.add_argument('--image_size', type=int, default=256, help='--reference_data crop size')
  p.add_argument('--preprocess', default='adm', choices=('adm', 'pytorch_fid'),
                 help="'adm' reproduces the ADM evaluator (and its reference statistics)")
  p.add_argument('--precision', default='highest', choices=('highest', 'default'),
                 help="'default' allows TF32 convolutions on GPUs (faster, ~1e-3 off)")
  p.add_argument('--per_device_batch', type=int, default=64, help='images per device per step')
  p.add_argument('--num_images', type=int, default=-1, help='first N samples; -1 = all')
  p.add_argument('--out', default='', help='JSON output (default: <samples>.eval.json)')
  return p


def _reference(args, extractor):
  from mvar_jax.evaluation import reference
  if args.reference:
    return reference.load(args.reference, extractor)
  if not args.reference_data:
    raise ValueError('give --reference (an npz) or --reference_data (a dataset to compute it from)')
  from mvar_jax.data import pipeline
  cfg = pipeline.default_data_config()
  cfg.name, cfg.data_dir, cfg.image_size = args.reference_data, args.reference_dir, args.image_size
  cfg.manual_dir = args.reference_manual_dir
  return reference.from_dataset(cfg, args.reference_split, extractor,
                                num_images=args.reference_images, cache=args.reference_cache)


def main(argv=None) -> dict:
  args = _parser().parse_args(argv)
  from mvar_jax import sharding
  sharding.initialize_distributed()
  import jax
  from mvar_jax.evaluation import evaluators, features, inception
  t0 = time.time()
  config = inception.InceptionConfig(preprocess=args.preprocess, precision=args.precision).validate()
  extractor = features.FeatureExtractor(inception.load_params(args.inception), config,
                                        per_device_batch=args.per_device_batch)
  ref = _reference(args, extractor)
  file_fid = evaluators.SamplesFileFID(args.samples, extractor=extractor, reference=ref,
                                       num_images=args.num_images)
  results = dict(file_fid.run(None))
  results['seconds'] = time.time() - t0
  results.update(samples=os.path.abspath(args.samples), preprocess=args.preprocess,
                 devices=jax.device_count())
  if jax.process_index() == 0:
    out = args.out or os.path.splitext(args.samples)[0] + '.eval.json'
    with open(out, 'w') as f:
      json.dump(results, f, indent=2)
    print(format_table(results))
    print(f'wrote {out}')
  return results


if __name__ == '__main__':
  main()
