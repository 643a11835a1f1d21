"""The Python API: converted weights load in one call and compute what the in-memory model does."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from mvar_jax import api, convert, transformer, vqvae
from mvar_jax.attention import AttentionConfig

PATCH_NUMS = (1, 2, 3, 4)


@pytest.fixture(scope='module')
def weights_dir(tmp_path_factory):
  v_cfg = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=16,
                            patch_nums=PATCH_NUMS, using_sa=False, using_mid_sa=False)
  t_cfg = transformer.TransformerConfig(
      depth=1, width=32, num_heads=2, vocab_size=16, cvae=8, num_classes=3, patch_nums=PATCH_NUMS,
      attention=AttentionConfig(refine_step=3, kernel_size=3)).validate()
  rbg = jax.random.key(0, impl='unsafe_rbg')  # threefry init compiles slowly on CPU
  v_params = convert.jax_tree_to_numpy(vqvae.init_params(v_cfg, rbg)['params'])
  t_params = convert.jax_tree_to_numpy(transformer.init_params(t_cfg, rbg)['params'])
  path = str(tmp_path_factory.mktemp('weights'))
  convert.save_converted(path, 'vqvae', v_cfg, v_params)
  convert.save_converted(path, 'transformer', t_cfg, t_params)
  return path, api.MVARPipeline(v_cfg, v_params, t_cfg, t_params)


def test_load_pretrained_computes_what_the_in_memory_pipeline_computes(weights_dir):
  path, reference = weights_dir
  pipe = api.load_pretrained(path)
  assert pipe.transformer_config == reference.transformer_config
  assert pipe.tokenizer_config == reference.tokenizer_config
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  ids = pipe.encode(images)
  for a, b in zip(ids, reference.encode(images)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(pipe.logits(ids, [0, 2]), reference.logits(ids, [0, 2]), atol=1e-6)
  assert pipe.decode(ids).shape == (2, 8, 8, 3)


def test_logits_of_one_scale_equal_that_slice_of_all_scales(weights_dir):
  _, pipe = weights_dir
  images = np.random.default_rng(1).random((2, 8, 8, 3)).astype(np.float32)
  ids = pipe.encode(images)
  full = np.asarray(pipe.logits(ids, [1, 1]))
  one = np.asarray(pipe.logits(ids, [1, 1], first=2, last=2))
  np.testing.assert_allclose(one, full[:, 5:14], atol=1e-5)


def test_attention_override_switches_to_var_mode(weights_dir):
  path, _ = weights_dir
  pipe = api.load_pretrained(path, attention=AttentionConfig(mode='var'))
  assert pipe.transformer_config.attention.mode == 'var'


def test_missing_files_and_mismatches_are_named(weights_dir, tmp_path):
  path, reference = weights_dir
  with pytest.raises(FileNotFoundError, match='vqvae'):
    api.load_pretrained(str(tmp_path))
  # A transformer file whose params do not fit its config.
  bad = dict(reference.transformer_params)
  bad['head'] = {'kernel': np.zeros((32, 17), np.float32), 'bias': np.zeros((17,), np.float32)}
  convert.save_converted(str(tmp_path), 'transformer', reference.transformer_config, bad)
  with pytest.raises(convert.CheckpointMismatchError, match='head'):
    api.load_converted(str(tmp_path), 'transformer')
  # A tokenizer and a transformer that disagree on the vocabulary.
  other = dataclasses.replace(reference.transformer_config, vocab_size=17)
  with pytest.raises(ValueError, match='vocab_size'):
    api.MVARPipeline(reference.tokenizer_config, reference.tokenizer_params, other,
                     reference.transformer_params)
  assert os.path.exists(os.path.join(path, 'transformer.json'))


def test_images_of_the_wrong_size_are_rejected(weights_dir):
  _, pipe = weights_dir
  with pytest.raises(ValueError, match=r'\(B, 8, 8, 3\)'):
    pipe.encode(np.zeros((1, 16, 16, 3), np.uint8))


def test_the_notebook_is_valid_and_its_python_compiles():
  import json
  root = os.path.dirname(os.path.dirname(__file__))
  with open(os.path.join(root, 'notebooks', 'mvar_jax_colab.ipynb')) as f:
    nb = json.load(f)
  code_cells = [c for c in nb['cells'] if c['cell_type'] == 'code']
  assert code_cells
  for cell in code_cells:
    source = ''.join(line for line in cell['source'] if not line.lstrip().startswith('!'))
    compile(source, 'cell', 'exec')
