"""Resize matrices reproduce torch.nn.functional.interpolate ('bicubic', 'area')."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvar_jax import resize
from mvar_jax.layout import DEFAULT_PATCH_NUMS

PNS = DEFAULT_PATCH_NUMS
LAST = PNS[-1]


def _torch_resize(x_BHWC, size, mode):
  x = torch.from_numpy(np.asarray(x_BHWC)).permute(0, 3, 1, 2)
  return F.interpolate(x, size=size, mode=mode).permute(0, 2, 3, 1).numpy()


def _pairs():
  # Every resize the tokenizer does: code maps pn -> 16 (bicubic), f_rest 16 -> pn (area);
  # the teacher input resizes f_hat 16 -> pn_{k+1}, which is among the latter.
  bicubic = [(pn, LAST) for pn in PNS[:-1]]
  area = [(LAST, pn) for pn in PNS[1:-1]] + [(LAST, PNS[0])]
  return [('bicubic', a, b) for a, b in bicubic] + [('area', a, b) for a, b in area]


@pytest.mark.parametrize('mode,n_in,n_out', _pairs())
def test_matches_torch_for_every_tokenizer_resize(mode, n_in, n_out):
  x = np.random.default_rng(n_in * 100 + n_out).standard_normal((2, n_in, n_in, 5), np.float32)
  fn = resize.resize_bicubic if mode == 'bicubic' else resize.resize_area
  got = np.asarray(jax.jit(fn, static_argnums=1)(x, (n_out, n_out)))
  np.testing.assert_allclose(got, _torch_resize(x, (n_out, n_out), mode), atol=1e-5, rtol=0)


@pytest.mark.parametrize('mode', ['bicubic', 'area'])
def test_non_square_and_both_directions(mode):
  x = np.random.default_rng(0).standard_normal((1, 7, 12, 3), np.float32)
  fn = resize.resize_bicubic if mode == 'bicubic' else resize.resize_area
  for size in [(5, 17), (13, 4), (7, 9)]:  # down+up, up+down, one axis unchanged
    np.testing.assert_allclose(np.asarray(fn(x, size)), _torch_resize(x, size, mode),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize('fn', [resize.bicubic_matrix, resize.area_matrix])
def test_rows_sum_to_one(fn):
  for n_in, n_out in [(1, 16), (3, 16), (16, 13), (16, 1), (13, 16), (5, 5), (10, 3)]:
    m = fn(n_in, n_out)
    assert m.shape == (n_out, n_in)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)


def test_same_size_is_identity_and_matrices_are_cached_read_only():
  np.testing.assert_array_equal(resize.bicubic_matrix(6, 6), np.eye(6))
  np.testing.assert_array_equal(resize.area_matrix(6, 6), np.eye(6))
  assert resize.area_matrix(16, 13) is resize.area_matrix(16, 13)
  with pytest.raises(ValueError):
    resize.area_matrix(16, 13)[0, 0] = 1.0


def test_area_windows_overlap_for_16_to_13():
  m = resize.area_matrix(16, 13)
  # Input pixel 1 lies in the windows of outputs 0 and 1 ([0, 2) and [1, 3)).
  assert m[0, 1] > 0 and m[1, 1] > 0


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match='sizes'):
    resize.bicubic_matrix(0, 4)
  with pytest.raises(ValueError, match='B, H, W, C'):
    resize.resize_area(np.zeros((4, 4, 3), np.float32), (2, 2))


@pytest.mark.parametrize('shape_in,shape_out', [((256, 256), (299, 299)), ((7, 12), (5, 19)),
                                                 ((300, 301), (299, 299))])
def test_bilinear_matches_torch_both_directions(shape_in, shape_out):
  x = np.random.default_rng(3).standard_normal((1, *shape_in, 2), np.float32)
  got = np.asarray(resize.resize_bilinear(x, shape_out))
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=shape_out, mode='bilinear',
                       align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_tf1_bilinear_reads_from_the_top_left_corner():
  # Legacy TF1 resize: output pixel i samples input i * in/out (no half-pixel shift), so
  # upsampling 2 -> 4 gives [a, (a+b)/2, b, b], where torch gives [a, a/4*3+b/4, ...].
  x = np.array([0.0, 8.0], np.float32).reshape(1, 2, 1, 1)
  np.testing.assert_allclose(np.asarray(resize.resize_bilinear_tf1(x, (4, 1)))[0, :, 0, 0],
                             [0.0, 4.0, 8.0, 8.0])
  np.testing.assert_allclose(np.asarray(resize.resize_bilinear(x, (4, 1)))[0, :, 0, 0],
                             [0.0, 2.0, 6.0, 8.0])
