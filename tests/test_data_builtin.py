"""The built-in shapes dataset: deterministic, balanced, valid images, distinct classes."""

import numpy as np
import pytest

from mvar_jax.data import builtin


def test_same_seed_same_images_and_different_seed_differs():
  a_img, a_lab = builtin.generate(40, seed=3)
  b_img, b_lab = builtin.generate(40, seed=3)
  c_img, _ = builtin.generate(40, seed=4)
  np.testing.assert_array_equal(a_img, b_img)
  np.testing.assert_array_equal(a_lab, b_lab)
  assert not np.array_equal(a_img, c_img)


def test_each_example_depends_only_on_index_and_seed():
  full_img, full_lab = builtin.generate(30, seed=5)
  part_img, part_lab = builtin.generate(12, seed=5, start=13)
  np.testing.assert_array_equal(part_img, full_img[13:25])
  np.testing.assert_array_equal(part_lab, full_lab[13:25])


@pytest.mark.parametrize('image_size', [32, 48, 64])
def test_images_are_uint8_rgb_of_the_requested_size(image_size):
  imgs, labels = builtin.generate(20, image_size=image_size, seed=1)
  assert imgs.shape == (20, image_size, image_size, 3) and imgs.dtype == np.uint8
  assert labels.shape == (20,) and labels.dtype == np.int32
  # Bright foreground on a dark background: both ends of the range are used.
  assert imgs.min() < 100 and imgs.max() > 150


def test_at_least_ten_classes_all_present_and_balanced():
  _, labels = builtin.generate(200, seed=0)
  counts = np.bincount(labels, minlength=10)
  assert len(counts) == 10 and (counts == 20).all()
  names = builtin.class_names(10)
  assert len(set(names)) == 10
  assert builtin.MAX_CLASSES >= 10


def test_classes_are_distinct_shape_hue_pairs():
  specs = [builtin.class_spec(k) for k in range(builtin.MAX_CLASSES)]
  assert len(set(specs)) == builtin.MAX_CLASSES
  # The first ten differ in both shape and hue.
  assert len({s for s, _ in specs[:10]}) == 10 and len({h for _, h in specs[:10]}) == 10


def test_images_vary_within_a_class():
  imgs, labels = builtin.generate(60, seed=2)
  same = imgs[labels == labels[0]]
  assert len(same) >= 2 and not np.array_equal(same[0], same[1])


def test_antialias_only_changes_edge_pixels():
  smooth, _ = builtin.generate(8, seed=0)
  hard, _ = builtin.generate(8, seed=0, antialias=False)
  changed = np.any(smooth != hard, axis=-1).mean()
  assert 0 < changed < 0.15


@pytest.mark.parametrize('kwargs', [dict(num_classes=0), dict(num_classes=builtin.MAX_CLASSES + 1),
                                    dict(image_size=4), dict(seed=-1)])
def test_invalid_arguments_raise(kwargs):
  with pytest.raises(ValueError):
    builtin.generate(2, **kwargs)
