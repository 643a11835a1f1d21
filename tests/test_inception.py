"""The Flax FID Inception equals pytorch-fid's InceptionV3 on the same (random) weights.

pytorch-fid's constructor downloads the real weights; the test intercepts that call and
hands the model its own (re-randomised) state dict, so nothing is downloaded.
"""

import jax
import numpy as np
import pytest

from mvar_jax.evaluation import inception
from pytorch_fid_ref import import_pytorch_fid  # tests/pytorch_fid_ref.py


@pytest.fixture(scope='module')
def torch_fid_model():
  """(pytorch-fid InceptionV3 pool block, the full FID Inception3) with shared random weights."""
  import torch
  pf = import_pytorch_fid()
  built = {}
  original = pf._inception_v3

  def record(*args, **kwargs):
    built['net'] = original(*args, **kwargs)
    return built['net']

  def no_download(*_, **__):  # the URL loader: return the model's own state instead
    return built['net'].state_dict()

  pf._inception_v3, pf.load_state_dict_from_url = record, no_download
  try:
    torch.manual_seed(0)
    model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  finally:
    pf._inception_v3 = original
  full = built['net']
  # Well-scaled random weights (as inception.random_params), drawn in torch.
  with torch.no_grad():
    for name, t in full.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      if name.endswith('weight') and t.ndim > 1:
        t.copy_(torch.randn_like(t) * np.sqrt(2.0 / np.prod(t.shape[1:])))
      elif name.endswith(('bn.weight', 'running_var')):
        t.copy_(torch.rand_like(t) + 0.5)
      else:
        t.copy_(0.1 * torch.randn_like(t))
  return model.eval(), full.eval()


def _torch_features(model, full, images_uint8):
  """pool (pytorch-fid block 3), spatial (Mixed_6d.branch1x1[:7], HWC-flat), logits (fc)."""
  import torch
  captured = {}
  hook = full.Mixed_6d.branch1x1.register_forward_hook(
      lambda m, i, o: captured.__setitem__('s', o))
  x = torch.from_numpy(images_uint8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  with torch.no_grad():
    pool = model(x)[0][:, :, 0, 0]
    logits = full.fc(pool)
  hook.remove()
  spatial = captured['s'][:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
  return {'pool': pool.numpy(), 'spatial': spatial.numpy(), 'logits': logits.numpy()}


def _rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_features_equal_pytorch_fid_through_the_converter(torch_fid_model):
  model, full = torch_fid_model
  state = {k: v.numpy() for k, v in full.state_dict().items()}
  params = inception.params_from_state_dict(state)
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)

  want = _torch_features(model, full, images)
  net = inception.FIDInception(inception.InceptionConfig(preprocess='pytorch_fid'))
  got = jax.jit(net.apply)({'params': params}, images)

  assert got['pool'].shape == (2, 2048)
  assert got['spatial'].shape == (2, 17 * 17 * 7)
  assert got['logits'].shape == (2, 1008)
  for name in ('pool', 'spatial', 'logits'):
    assert np.abs(want[name]).max() > 1e-2, f'{name} is degenerate: the test would prove nothing'
    err = _rel_err(got[name], want[name])
    assert err < 1e-4, f'{name}: relative error {err:.2e} vs pytorch-fid'
    np.testing.assert_allclose(got[name], want[name], rtol=1e-3,
                               atol=1e-4 * np.abs(want[name]).max())



def test_adm_preprocessing_is_the_tf1_graph_resize_and_128_scaling():
  """The ADM graph: ResizeBilinear(align_corners=False) of [0, 255] to 299, then (x - 128) / 128."""
  import tensorflow as tf
  images = np.random.default_rng(1).integers(0, 256, (2, 256, 200, 3), dtype=np.uint8)
  want = tf.compat.v1.image.resize_bilinear(images.astype(np.float32), (299, 299),
                                            align_corners=False, half_pixel_centers=False)
  want = (want.numpy() - 128.0) / 128.0
  got = jax.jit(inception.preprocess, static_argnums=1)(images, 'adm')
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  # pytorch-fid's half-pixel resize is another image: the two references do differ.
  assert np.abs(np.asarray(inception.preprocess(images, 'pytorch_fid')) - want).max() > 0.05


def test_pth_file_converts_once_and_loads_from_the_directory(torch_fid_model, tmp_path):
  import torch
  _, full = torch_fid_model
  torch.save(full.state_dict(), tmp_path / 'pt_inception-2015-12-05-test.pth')
  inception.main(['--pth', str(tmp_path / 'pt_inception-2015-12-05-test.pth'),
                  '--out', str(tmp_path / 'inception')])
  from_dir = inception.load_params(str(tmp_path / 'inception'))
  from_pth = inception.load_params(str(tmp_path / 'pt_inception-2015-12-05-test.pth'))
  want = full.Mixed_6d.branch7x7_2.conv.weight.detach().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(from_dir['Mixed_6d']['branch7x7_2']['conv']['kernel'], want)
  np.testing.assert_array_equal(from_pth['fc']['kernel'], full.fc.weight.detach().numpy().T)
  with pytest.raises(FileNotFoundError, match='nowhere.pth'):
    inception.load_params(str(tmp_path / 'nowhere.pth'))


def test_converter_names_every_key_that_does_not_fit():
  from mvar_jax import convert
  from mvar_jax.convert import CheckpointMismatchError
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), inception.abstract_params())
  state = convert.params_to_state_dict(zeros)
  state['bn_typo.weight'] = np.zeros(3, np.float32)
  del state['fc.bias']
  state['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(CheckpointMismatchError) as e:
    inception.params_from_state_dict(state)
  msg = str(e.value)
  assert 'bn_typo.weight' in msg and 'fc/bias' in msg and 'fc.weight' in msg


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match='preprocess'):
    inception.InceptionConfig(preprocess='tf2').validate()
  with pytest.raises(ValueError, match='precision'):
    inception.InceptionConfig(precision='bf16').validate()
