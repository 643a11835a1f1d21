"""Reading .pth files safely and converting them one tensor at a time."""

import argparse
import collections
import os

import jax
import numpy as np
import pytest
import torch
import flax.linen as nn
from flax import serialization

from mvar_jax import api, convert, converted_io, transformer
from mvar_jax.attention import AttentionConfig

PATCH_NUMS = (1, 2, 3)


def tiny_config():
  return transformer.TransformerConfig(
      depth=2, width=32, num_heads=2, vocab_size=16, cvae=8, num_classes=3, patch_nums=PATCH_NUMS,
      attention=AttentionConfig(refine_step=2, kernel_size=3)).validate()


def official_state_dict(config, seed=0):
  """Random weights under the official key names and shapes (torch tensors)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))['params']
  params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                  nn.unbox(abstract))
  return {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in convert.params_to_state_dict(params).items()}


class _Payload:
  """Unpickling this creates `marker`: stands in for whatever code a crafted file could run."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (exec, (f'open({self.marker!r}, "w").close()',))


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_a_crafted_pickle_is_refused_and_its_payload_never_runs(tmp_path, zip_format):
  marker = str(tmp_path / 'payload_ran')
  path = str(tmp_path / 'crafted.pth')
  sd = official_state_dict(tiny_config())
  torch.save({'mvar_wo_ddp': sd, 'extra': _Payload(marker)}, path,
             _use_new_zipfile_serialization=zip_format)
  out = str(tmp_path / 'out')
  with pytest.raises(convert.UnsafeCheckpointError, match='--trust_pickle') as info:
    convert.main(['--transformer', path, '--out', out, '--patch_nums', '1_2_3'])
  assert 'exec' in str(info.value)  # names what the file wanted to call
  assert not os.path.exists(marker)
  assert not os.path.exists(os.path.join(out, 'transformer.msgpack'))
  # The payload is real: opting in runs it (and the tensors still convert).
  convert.main(['--transformer', path, '--out', out, '--patch_nums', '1_2_3', '--refine_step', '2',
                '--kernel_size', '3', '--trust_pickle'])
  assert os.path.exists(marker)
  assert os.path.exists(os.path.join(out, 'transformer.msgpack'))


@pytest.mark.parametrize('args', ['ordered_dict', 'namespace'])
def test_official_training_checkpoints_load_without_trusting_pickle(tmp_path, args):
  """What the official trainers save: state dicts, AdamW state, trainer config and the args."""
  config = tiny_config()
  sd = official_state_dict(config, seed=1)
  model = torch.nn.Linear(4, 3)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  model(torch.ones(2, 4)).sum().backward()
  opt.step()
  arg_values = collections.OrderedDict(
      depth=2, tblr=1e-4, tlr=None, pn='1_2_3', patch_nums=(1, 2, 3), resos=(16, 32, 48),
      fp16=0, afuse=True, cur_it='1/10', L_mean=np.float64(5.1), acc_mean=np.float32(3.0),
      seed=None)
  saved_args = arg_values if args == 'ordered_dict' else argparse.Namespace(**arg_values)
  path = str(tmp_path / 'mvar-ckpt-ep-1.pth')
  torch.save({'epoch': 1, 'iter': 0,
              'trainer': {'config': {'patch_nums': (1, 2, 3), 'resos': (16, 32, 48),
                                     'label_smooth': 0.0},
                          'mvar_wo_ddp': sd, 'mvar_opt': {'optimizer': opt.state_dict()}},
              'args': saved_args}, path)
  loaded = convert.load_torch_file(path)
  assert loaded['trainer']['mvar_opt']['optimizer']['param_groups'][0]['betas'] == (0.9, 0.95)
  out = str(tmp_path / 'out')
  convert.convert_file(path, out, 'transformer', patch_nums=PATCH_NUMS,
                       attention=config.attention)
  cfg, params = api.load_converted(out, 'transformer')
  assert (cfg.depth, cfg.width, cfg.patch_nums) == (config.depth, config.width, PATCH_NUMS)
  want = convert.state_dict_to_params(convert.extract_state_dict(sd), params, 'transformer')
  for (path_a, a), (path_b, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                                      jax.tree_util.tree_leaves_with_path(want)):
    assert path_a == path_b
    np.testing.assert_array_equal(np.asarray(a), b)


def test_streamed_conversion_writes_what_flax_would_write_for_the_in_memory_conversion(tmp_path):
  config = tiny_config()
  sd = official_state_dict(config, seed=2)
  sd['lvl_1L'] = torch.zeros(1, config.layout.total_len, dtype=torch.long)  # ignored buffer
  path = str(tmp_path / 'mvar.pth')
  torch.save({'mvar_wo_ddp': sd}, path)
  out = str(tmp_path / 'out')
  got_cfg = convert.convert_file(path, out, 'transformer', patch_nums=PATCH_NUMS,
                                 attention=config.attention)
  cfg, params = convert.convert_transformer(convert.extract_state_dict(sd), config=config)
  assert (got_cfg.depth, got_cfg.width, got_cfg.vocab_size) == (2, 32, 16)
  with open(os.path.join(out, 'transformer.msgpack'), 'rb') as f:
    assert f.read() == serialization.msgpack_serialize(params)  # same bytes as before streaming
  manifest = converted_io._read_manifest(out, 'transformer')  # pylint: disable=protected-access
  assert set(manifest['files']) == {'transformer.msgpack', 'transformer.json'}


def test_half_precision_checkpoints_are_converted_to_float32(tmp_path):
  config = tiny_config()
  sd = {k: v.to(torch.bfloat16) for k, v in official_state_dict(config, seed=3).items()}
  path = str(tmp_path / 'mvar_bf16.pth')
  torch.save(sd, path)
  convert.convert_file(path, str(tmp_path), 'transformer', patch_nums=PATCH_NUMS,
                       attention=config.attention)
  _, params = converted_io.read_converted(str(tmp_path), 'transformer')
  head = params['head']['kernel']
  assert head.dtype == np.float32
  np.testing.assert_array_equal(head, sd['head.weight'].float().numpy().T)
