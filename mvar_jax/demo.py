"""The end-to-end demo: tokenizer -> token cache -> MVAR -> samples -> class consistency.

    python main.py --config=configs/demo.py --workdir=workdirs/demo

Stages (each reuses its output when the workdir already holds it, so a rerun resumes):
1. train a small VQ-VAE on the built-in shapes dataset (`<workdir>/tokenizer`);
2. encode the training images once into a token cache (`<workdir>/tokens`);
3. train a small MVAR from the cache (`<workdir>/mvar`, Orbax checkpoints, TensorBoard);
4. sample `demo.samples_per_class` images of every class (`<workdir>/mvar/samples`);
5. measure class consistency: a small CNN trained on fresh built-in images classifies
   the samples; the share recognised as their conditioning class is reported beside the
   wall time and the final losses (`<workdir>/demo_report.json`).
`train_models` runs stages 1-3 alone; `load_pipeline(workdir)` turns their result into an
`api.MVARPipeline` (the notebook uses both).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mvar_jax import lifecycle, sample_mode, train, train_tokenizer
from mvar_jax.data import pipeline, token_cache


def build_token_cache(config: ml_collections.ConfigDict, tok_cfg, tok_params, path: str,
                      split: str) -> None:
  """Encodes the (unshuffled, unflipped) images of `split` once into `path`."""
  if token_cache.is_complete(path):  # a part left half-written by a crash is rebuilt below
    logging.info('demo: reusing token cache %s', path)
    return
  from mvar_jax import vqvae, xla_cpu
  tok = vqvae.Tokenizer(tok_cfg)
  encode = jax.jit(lambda p, x: jnp.concatenate(tok.img_to_ids(p, x), axis=1),
                   compiler_options=xla_cpu.conv_net_options())
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  batches = pipeline.create_dataset(data_cfg, split=split, batch_size=config.demo_opts.encode_batch,
                                    shuffle=False, repeat=False, drop_remainder=False)
  token_cache.build_token_cache(
      batches, lambda images: encode(tok_params, jnp.asarray(images)), path,
      num_scales_len=tok_cfg.layout.total_len, vocab_size=tok_cfg.vocab_size,
      patch_nums=tok_cfg.patch_nums, image_size=tok_cfg.resolution)


def class_consistency_of(config, npz_path: str) -> dict:
  """Share of samples that a classifier trained on fresh built-in images assigns to their label."""
  from mvar_jax import class_consistency as cc
  data = np.load(npz_path)
  images, labels = data['arr_0'], data['arr_1']
  clf = cc.train_classifier(image_size=config.data.image_size,
                            num_classes=config.data.num_classes, steps=config.demo_opts.classifier_steps,
                            seed=config.seed + 1)
  predicted = cc.classify(clf, images)
  per_class = {int(c): float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)}
  return dict(class_consistency=float(np.mean(predicted == labels)), per_class=per_class,
              num_samples=int(len(labels)))


def train_models(config: ml_collections.ConfigDict, workdir: str,
                 timings: dict | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """Stages 1-3 (tokenizer, token cache, MVAR); returns (the MVAR run's config, its metrics)."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  timings = {} if timings is None else timings
  t0 = time.time()
  tok_cfg, tok_params = train_tokenizer.train_tokenizer(config, workdir)
  timings['tokenizer_s'] = time.time() - t0

  t1 = time.time()
  cache = os.path.join(workdir, 'tokens')
  for split in ('train', 'val'):  # the token pipeline reads <data_dir>/<split>
    build_token_cache(config, tok_cfg, tok_params, os.path.join(cache, split), split)
  timings['token_cache_s'] = time.time() - t1

  mvar_config = ml_collections.ConfigDict(config.to_dict())
  mvar_config.tokenizer.checkpoint = os.path.join(workdir, 'tokenizer')
  mvar_config.data.name = 'tokens'
  mvar_config.data.data_dir = cache
  mvar_workdir = os.path.join(workdir, 'mvar')
  t2 = time.time()
  metrics = train.train_and_evaluate(mvar_config, mvar_workdir)
  timings['mvar_s'] = time.time() - t2
  return mvar_config, metrics


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage; returns (and writes) the report.

  The workdir is locked for the whole demo (lifecycle.WorkdirLock); a rerun of a finished
  demo reuses every stage and reports the final metrics the MVAR run kept.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with lifecycle.WorkdirLock(workdir):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  t0 = time.time()
  timings = {}
  mvar_config, metrics = train_models(config, workdir, timings)
  mvar_workdir = os.path.join(workdir, 'mvar')

  t3 = time.time()
  mvar_config.sample.num_images = config.demo_opts.samples_per_class * config.data.num_classes
  npz = sample_mode.run(mvar_config, mvar_workdir)
  timings['sampling_s'] = time.time() - t3

  t4 = time.time()
  report = class_consistency_of(config, npz)
  timings['classifier_s'] = time.time() - t4
  timings['total_s'] = time.time() - t0
  report.update(timings)
  report['final_metrics'] = {k: float(v) for k, v in (metrics or {}).items()
                             if np.ndim(v) == 0}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'demo_report.json'), 'w') as f:
      json.dump(report, f, indent=2)
  logging.info('demo report: %s', json.dumps(report, indent=2))
  print(summary(report, workdir))
  return report


def load_pipeline(workdir: str):
  """An `api.MVARPipeline` of a demo workdir: its tokenizer and the newest MVAR checkpoint.

  The architecture comes from the config saved beside the checkpoint, so any demo size loads.
  """
  from mvar_jax import api, checkpointing
  workdir = os.path.abspath(workdir)
  mvar_dir = os.path.join(workdir, 'mvar')
  ckpt = checkpointing.Checkpointer(os.path.join(mvar_dir, 'checkpoints'))
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f'no MVAR checkpoint under {mvar_dir}: run the demo first '
                            f'(python main.py --config=configs/demo.py --workdir={workdir})')
  config = ml_collections.ConfigDict(json.loads(ckpt.restore_meta()['config']))
  ckpt.close()
  config.sample.checkpoint = ''
  model, params, _ = sample_mode.load_params(config, mvar_dir)
  tok, tok_params = train.load_tokenizer_for(model.config, os.path.join(workdir, 'tokenizer'))
  return api.MVARPipeline(tok.config, tok_params, model.config, params)


def summary(report: dict, workdir: str) -> str:
  m = report['final_metrics']
  loss = {k: v for k, v in m.items() if 'loss' in k}
  lines = [
      '', '=' * 64, 'mvar-jax demo',
      f"  wall time           {report['total_s'] / 60:.1f} min  (tokenizer "
      f"{report['tokenizer_s']:.0f} s, token cache {report['token_cache_s']:.0f} s, MVAR "
      f"{report['mvar_s']:.0f} s, sampling {report['sampling_s']:.0f} s, classifier "
      f"{report['classifier_s']:.0f} s)",
      f"  class consistency   {100 * report['class_consistency']:.1f}% of "
      f"{report['num_samples']} samples",
  ]
  for k in sorted(loss):
    lines.append(f'  {k:<20}{loss[k]:.4f}')
  lines += [f'  samples             {workdir}/mvar/samples/samples.png', '=' * 64]
  return '\n'.join(lines)
