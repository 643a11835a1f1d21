"""Feature extraction sharded over an 8-device CPU mesh equals one device, in input order."""

import jax
import numpy as np
import pytest

from mvar_jax.evaluation import features, inception


@pytest.fixture(scope='module')
def params():
  return inception.random_params(seed=0)


def test_eight_device_mesh_equals_one_device_and_keeps_order(params):
  assert len(jax.devices()) == 8  # conftest: jax_num_cpu_devices
  images = np.random.default_rng(0).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)

  one = features.FeatureExtractor(params, per_device_batch=5,
                                  mesh=features.data_mesh(jax.devices()[:1]))
  want = one.of_array(images, progress=False)
  eight = features.FeatureExtractor(params, per_device_batch=4)
  assert eight.mesh.size == 8 and eight.global_batch == 32
  rows = []
  run = eight._fn
  eight._fn = lambda p, x: rows.append(x.shape[0]) or run(p, x)
  got = eight.of_array(images, progress=False)
  # Fewer images than one global batch: one batch of a row per device (5 images + 3 padding
  # rows), not 32 rows.
  assert rows == [8]

  for k, dim in (('pool', 2048), ('spatial', 2023), ('logits', 1008)):
    assert got[k].shape == (5, dim)
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5 * np.abs(want[k]).max())
  # Rows follow the input: image 3 alone gives row 3.
  assert not np.allclose(want['pool'][0], want['pool'][1])
  # ADM's logits read the classifier's weight only (no bias).
  np.testing.assert_allclose(got['logits'], got['pool'] @ np.asarray(params['fc']['kernel']),
                             rtol=1e-4, atol=1e-4 * np.abs(got['logits']).max())

  # A stream of uneven batches of a known total gives the same rows.
  streamed = eight.of_batches([images[:2], images[2:]], total=5, progress=False)
  np.testing.assert_allclose(streamed['pool'], got['pool'], rtol=1e-6, atol=1e-6)
  assert rows == [8, 8, 8]  # one step per batch of the stream, each of 8 rows


def test_bad_images_are_named():
  ex = features.FeatureExtractor(inception.random_params(seed=1), per_device_batch=1)
  with pytest.raises(ValueError, match=r'\(B, H, W, 3\)'):
    ex.of_batches([np.zeros((2, 8, 8), np.uint8)], progress=False)
  with pytest.raises(ValueError, match='no images'):
    ex.of_array(np.zeros((0, 8, 8, 3), np.uint8), progress=False)
