"""LPIPS (VGG16, v0.1) in Flax equals the `lpips` package on the same weights.

The reference is the package's own `LPIPS(net='vgg', pnet_rand=True)`: its shipped linear
heads and a randomly initialised VGG16 trunk (nothing is downloaded).

torchvision note: the `lpips` package imports torchvision only to build `vgg16().features`.
The torchvision wheels that pair with the CPU torch 2.13.0 are CUDA builds whose C extension
cannot load on a CPU-only torch, so importing torchvision fails here. The reference
therefore gets a stand-in `torchvision.models.vgg16` that builds the `features` stack
from torchvision's own layer table (cfg 'D', read from its installed source without
importing it): Conv3x3(pad 1) + ReLU per width, MaxPool(2) per 'M', exactly as
torchvision's `make_layers`. Everything else (scaling, normalisation, heads, averaging,
layer taps) is the package's code.
"""

import ast
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax import convert, lpips as jlpips

torch = pytest.importorskip('torch')
if importlib.util.find_spec('lpips') is None:
  pytest.skip('the lpips package is a test dependency (requirements-test.txt)',
              allow_module_level=True)

_CFG_D = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']


def _torchvision_cfg_d():
  """cfg 'D' from the installed torchvision source (no import), else the published table."""
  spec = importlib.util.find_spec('torchvision')
  if spec is None or not spec.submodule_search_locations:
    return _CFG_D
  path = os.path.join(list(spec.submodule_search_locations)[0], 'models', 'vgg.py')
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    value = getattr(node, 'value', None)
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(value, ast.Dict):
      table = ast.literal_eval(value)
      if 'D' in table:
        return table['D']
  return _CFG_D


def _stand_in_torchvision():
  nn = torch.nn
  cfg = _torchvision_cfg_d()

  def vgg16(pretrained=False, weights=None, **_):
    assert not pretrained and weights is None, 'the reference must not download weights'
    layers, cin = [], 3
    for v in cfg:
      if v == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        cin = v
    return types.SimpleNamespace(features=nn.Sequential(*layers))

  tv = types.ModuleType('torchvision')
  tv.models = types.SimpleNamespace(vgg16=vgg16)
  return tv


@pytest.fixture(scope='module')
def reference():
  """(lpips.LPIPS vgg module with a random trunk, its trunk as a torchvision state dict)."""
  stand_in = _stand_in_torchvision()
  saved = {k: v for k, v in sys.modules.items() if k.split('.')[0] in ('lpips', 'torchvision')}
  for k in saved:
    del sys.modules[k]
  sys.modules['torchvision'] = stand_in
  try:
    import lpips as lpips_pkg
    torch.manual_seed(0)
    model = lpips_pkg.LPIPS(net='vgg', version='0.1', pnet_rand=True, verbose=False)
    with torch.no_grad():  # non-zero biases so that the bias mapping is exercised
      for name, p in model.net.named_parameters():
        if name.endswith('bias'):
          p.normal_(0.0, 0.05)
  finally:
    for k in [k for k in sys.modules if k.split('.')[0] in ('lpips', 'torchvision')]:
      del sys.modules[k]
    sys.modules.update(saved)
  # lpips stores the trunk as net.slice<j>.<torchvision index>.*: back to `features.<index>.*`.
  vgg_sd = {'features.' + '.'.join(k.split('.')[1:]): v.numpy()
            for k, v in model.net.state_dict().items()}
  return model, vgg_sd


def _images(seed, shape=(2, 64, 64, 3)):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_matches_lpips_package_on_its_heads_and_a_random_vgg(reference, tmp_path):
  model, vgg_sd = reference
  # The CLI path a user takes: a torchvision .pth file + the heads of the installed package.
  torch.save({k: torch.from_numpy(v) for k, v in vgg_sd.items()}, tmp_path / 'vgg16.pth')
  jlpips.main(['--vgg16', str(tmp_path / 'vgg16.pth'), '--out', str(tmp_path)])
  params = jlpips.load_params(str(tmp_path / 'lpips_vgg.msgpack'))

  x, y = _images(1), _images(2)
  y[1] = 0.7 * x[1] + 0.3 * y[1]  # one near pair, one far pair
  with torch.no_grad():
    want = model(torch.from_numpy(x).permute(0, 3, 1, 2),
                 torch.from_numpy(y).permute(0, 3, 1, 2)).numpy().reshape(-1)
  apply = jax.jit(jlpips.LPIPS().apply)
  got = np.asarray(apply({'params': params}, x, y))
  assert got.shape == (2,)
  np.testing.assert_allclose(apply({'params': params}, x, x), 0.0, atol=1e-12)
  assert want[0] > want[1] > 0
  print('lpips: ours', got, 'package', want, 'max abs diff', np.abs(got - want).max())
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_heads_are_the_packages_shipped_ones(reference):
  model, vgg_sd = reference
  heads = convert.extract_state_dict(convert.load_torch_file(jlpips.package_heads_path()))
  params = jlpips.convert_lpips(vgg_sd, heads)
  for k in range(5):
    want = model.lins[k].model[-1].weight.detach().numpy().reshape(-1)
    np.testing.assert_array_equal(np.asarray(params[f'lin{k}']['kernel']).reshape(-1), want)


def _random_params(seed=0):
  """Random trunk and heads without compiling `init` (shapes from eval_shape)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: jlpips.init_params(jax.random.key(0)))
  params = jax.tree_util.tree_map(
      lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  for k in range(5):  # the learned heads are non-negative (lpips clamps them in training)
    params[f'lin{k}']['kernel'] = np.abs(params[f'lin{k}']['kernel'])
  return params


def test_gradient_flows_to_the_reconstruction():
  params = _random_params()
  x = jnp.asarray(_images(3, (1, 16, 16, 3)))
  fn = lambda a, b: jlpips.LPIPS().apply({'params': params}, a, b).sum()
  value, g = jax.value_and_grad(fn)(x * 0.5, x)
  assert float(value) > 0
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


def test_converter_names_every_missing_or_misshaped_key(reference):
  _, vgg_sd = reference
  heads = convert.extract_state_dict(convert.load_torch_file(jlpips.package_heads_path()))
  broken = dict(vgg_sd)
  del broken['features.28.bias']
  broken['features.0.weight'] = broken['features.0.weight'][:32]
  with pytest.raises(convert.CheckpointMismatchError) as e:
    jlpips.convert_lpips(broken, heads)
  assert 'net/features_28/bias' in str(e.value) and 'net.features.0.weight' in str(e.value)


def test_load_rejects_missing_file_and_wrong_architecture(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m mvar_jax.lpips'):
    jlpips.load_params(str(tmp_path / 'absent.msgpack'))
  params = _random_params()
  params['lin0']['kernel'] = params['lin0']['kernel'][:, :, :3]
  jlpips.save_params(str(tmp_path / 'bad.msgpack'), params)
  with pytest.raises(convert.CheckpointMismatchError):
    jlpips.load_params(str(tmp_path / 'bad.msgpack'))


def test_random_trunk_weights_file_for_the_demo_recipe(tmp_path):
  jlpips.main(['--random_trunk_seed', '3', '--out', str(tmp_path)])
  saved = jlpips.load_params(str(tmp_path / 'lpips_vgg.msgpack'))
  drawn, _ = jlpips.random_params(3)
  for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(drawn)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(SystemExit):  # neither source given
    jlpips.main(['--out', str(tmp_path)])
