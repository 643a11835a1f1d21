"""`python -m mvar_jax.evaluate`: samples.npz + reference -> table and JSON; cached references."""

import json
import os

import jax
import numpy as np
import pytest

from mvar_jax import convert, evaluate
from mvar_jax.data import pipeline
from mvar_jax.evaluation import features, inception, reference


@pytest.fixture(scope='module')
def weights_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('inception'))
  convert.save_converted(d, 'inception', inception.InceptionConfig(), inception.random_params(0))
  return d


def test_cli_scores_a_set_against_itself_as_perfect(weights_dir, tmp_path, capsys):
  images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  np.savez(tmp_path / 'samples.npz', arr_0=images, arr_1=np.arange(6))
  np.savez(tmp_path / 'ref.npz', arr_0=images)  # an ADM-style batch without statistics

  results = evaluate.main(['--samples', str(tmp_path / 'samples.npz'), '--reference',
                           str(tmp_path / 'ref.npz'), '--inception', weights_dir,
                           '--per_device_batch', '1'])

  table = capsys.readouterr().out
  for name in ('FID', 'sFID', 'Inception Score', 'Precision', 'Recall', 'images'):
    assert name in table
  with open(tmp_path / 'samples.eval.json') as f:
    saved = json.load(f)
  assert saved['num_images'] == saved['num_reference'] == 6
  assert saved['devices'] == 8
  assert abs(saved['fid']) < 1e-3 and abs(saved['sfid']) < 1e-3  # the same images
  assert saved['precision'] == saved['recall'] == 1.0
  assert 1.0 <= saved['inception_score'] <= 6.0
  assert results['fid'] == saved['fid']


def test_reference_from_a_dataset_is_cached_and_checked(weights_dir, tmp_path):
  cfg = pipeline.default_data_config()
  cfg.builtin_val_size = 6
  extractor = features.FeatureExtractor(inception.load_params(weights_dir), per_device_batch=1)
  cache = str(tmp_path / 'ref_val.npz')
  ref = reference.from_dataset(cfg, 'val', extractor, cache=cache)
  assert ref.pool.shape == (6, 2048) and ref.sigma.shape == (2048, 2048)
  assert ref.mu_s.shape == (2023,) and ref.sigma.dtype == np.float64

  again = reference.load(cache, extractor)  # no extraction: the cache holds the features
  np.testing.assert_array_equal(again.pool, ref.pool)
  np.testing.assert_array_equal(again.sigma_s, ref.sigma_s)

  # Statistics of another preprocessing are refused, naming both.
  other = features.FeatureExtractor(inception.load_params(weights_dir),
                                    inception.InceptionConfig(preprocess='pytorch_fid'),
                                    per_device_batch=1)
  with pytest.raises(ValueError, match="'adm'.*'pytorch_fid'"):
    reference.load(cache, other)


def test_bad_reference_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.npz'):
    reference.load(str(tmp_path / 'nowhere.npz'))
  np.savez(tmp_path / 'odd.npz', images=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match='arr_0'):
    reference.load(str(tmp_path / 'odd.npz'))
  with pytest.raises(ValueError, match="no array 'arr_0'"):
    features.NpzImages(str(tmp_path / 'odd.npz'))


def test_npz_images_reads_the_rows_asked_for(tmp_path):
  arr = np.random.default_rng(1).integers(0, 256, (7, 3, 2, 3), dtype=np.uint8)
  np.savez(tmp_path / 's.npz', arr_0=arr)
  imgs = features.NpzImages(str(tmp_path / 's.npz'))
  assert len(imgs) == 7
  np.testing.assert_array_equal(imgs[5:7], arr[5:7])
  np.testing.assert_array_equal(imgs[0:3], arr[0:3])
  np.testing.assert_array_equal(imgs[6:99], arr[6:])
