"""The demo pipeline end to end on a tiny budget: tokenizer, token cache, MVAR, samples, report."""

import json
import os

import numpy as np
import pytest

from configs import demo as demo_config
from mvar_jax import demo


def tiny_demo_config():
  config = demo_config.get_config('quick')
  config.tokenizer.steps = 4
  config.tokenizer.log_every = 2
  config.tokenizer.batch_size = 8
  config.train.num_steps = 4
  config.train.batch_size = 8
  config.train.checkpoint_every = 2
  config.train.log_every = 2
  config.train.eval_batches = 1
  config.model.depth = 1
  config.model.width = 32
  config.model.num_heads = 2
  config.data.builtin_train_size = 64
  config.data.builtin_val_size = 16
  config.demo_opts.samples_per_class = 1
  config.demo_opts.classifier_steps = 20
  config.demo_opts.encode_batch = 32
  config.sample.batch_size = 10
  return config


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports(tiny_demo_run):
  workdir, report = tiny_demo_run  # conftest: demo.run(tiny_demo_config(), workdir)

  # Every stage left its output where the next one (and a rerun) finds it.
  assert os.path.exists(os.path.join(workdir, 'tokenizer', 'vqvae.msgpack'))
  assert os.listdir(os.path.join(workdir, 'tokens', 'train'))
  assert os.listdir(os.path.join(workdir, 'mvar', 'checkpoints'))
  samples = np.load(os.path.join(workdir, 'mvar', 'samples', 'samples.npz'))
  assert samples['arr_0'].shape == (10, 32, 32, 3) and samples['arr_0'].dtype == np.uint8
  np.testing.assert_array_equal(samples['arr_1'], np.arange(10))

  with open(os.path.join(workdir, 'demo_report.json')) as f:
    saved = json.load(f)
  assert saved['num_samples'] == 10
  assert 0.0 <= saved['class_consistency'] <= 1.0
  assert np.isfinite(saved['final_metrics']['train/loss'])
  assert report['class_consistency'] == saved['class_consistency']

  # A rerun resumes: the tokenizer and the cache are reused, MVAR is already at its last step.
  mtime = os.path.getmtime(os.path.join(workdir, 'tokenizer', 'vqvae.msgpack'))
  again = demo.run(tiny_demo_config(), workdir)
  assert os.path.getmtime(os.path.join(workdir, 'tokenizer', 'vqvae.msgpack')) == mtime
  assert again['num_samples'] == 10
  # The finished MVAR run reports the final metrics it kept; the report keeps them too.
  assert again['final_metrics'] == saved['final_metrics']
  assert 'val/loss' in again['final_metrics']
  with open(os.path.join(workdir, 'demo_report.json')) as f:
    assert json.load(f)['final_metrics'] == saved['final_metrics']
