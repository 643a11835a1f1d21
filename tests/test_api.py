"""The Python API: converted weights load in one call and compute what the in-memory model does."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax import api, convert, sampling, transformer, vqvae
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


def test_dtype_overrides_reach_both_models(weights_dir):
  path, reference = weights_dir
  pipe = api.load_pretrained(path, dtype='bfloat16', decoder_dtype='bfloat16',
                             param_dtype='bfloat16')
  assert pipe.transformer_config.dtype == 'bfloat16'
  assert pipe.tokenizer_config.decoder_dtype == 'bfloat16'
  dtypes = {a.dtype for a in jax.tree_util.tree_leaves(pipe.transformer_params)}
  assert dtypes == {jnp.dtype('bfloat16')}
  # Cast on the host as each tensor is read: the same bits as casting the fp32 params on
  # the device (sampling.inference_params), without both copies on the device at once.
  on_device = sampling.inference_params(reference.transformer_params, 'bfloat16')
  for a, b in zip(jax.tree_util.tree_leaves(pipe.transformer_params),
                  jax.tree_util.tree_leaves(on_device)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
  # The decode's convs come pre-cast (the sampler would cast them on every call); the
  # encoder and the GroupNorms stay fp32.
  v = pipe.tokenizer_params
  assert v['decoder']['conv_in']['kernel'].dtype == jnp.bfloat16
  assert v['post_quant_conv']['kernel'].dtype == jnp.bfloat16
  assert v['decoder']['norm_out']['scale'].dtype == jnp.float32
  assert v['encoder']['conv_in']['kernel'].dtype == jnp.float32
  assert reference.tokenizer_config.decoder_dtype == 'float32'  # stored: unchanged by default
  with pytest.raises(ValueError, match="param_dtype must be one of .* got 'bf16'"):
    api.load_pretrained(path, param_dtype='bf16')


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


# ----------------------------------------------------------------------------- input checks
# Every entry point names the argument and the allowed range instead of computing garbage.

def _ids(pipe, seed=0):
  images = np.random.default_rng(seed).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  return pipe.encode(images)


@pytest.mark.parametrize('labels, match', [
    ([0, 3], r'labels must be in \[0, 3\) .*allow_null_class'),  # 3 classes: 3 is the null class
    ([0, 11], r'labels must be in \[0, 3\)'),
    ([-1, 0], r'labels must be in \[0, 3\)'),
    ([0], r'labels has 1 entries but the ids have batch 2'),
    ([0.5, 1], 'labels must be integer class ids'),
])
def test_logits_rejects_labels_out_of_range(weights_dir, labels, match):
  _, pipe = weights_dir
  with pytest.raises(ValueError, match=match):
    pipe.logits(_ids(pipe), labels)


def test_logits_takes_the_null_class_only_when_asked(weights_dir):
  _, pipe = weights_dir
  ids = _ids(pipe)
  null = np.asarray(pipe.logits(ids, [3, 3], allow_null_class=True))
  assert null.shape[0] == 2 and np.isfinite(null).all()
  assert not np.allclose(null, np.asarray(pipe.logits(ids, [0, 0])))


@pytest.mark.parametrize('first, last, match', [(0, 4, 'last'), (-1, 2, 'first'), (2, 1, 'first')])
def test_logits_rejects_bad_scale_ranges(weights_dir, first, last, match):
  _, pipe = weights_dir
  with pytest.raises(ValueError, match=match):
    pipe.logits(_ids(pipe), [0, 1], first=first, last=last)


def test_decode_rejects_ids_outside_the_vocabulary(weights_dir):
  _, pipe = weights_dir
  ids = [np.asarray(a) for a in _ids(pipe)]
  ids[2] = ids[2].copy()
  ids[2][0, 0] = 16  # vocabulary of 16
  with pytest.raises(ValueError, match=r'ids\[2\] \(scale 2\) must be in \[0, vocab_size=16\)'):
    pipe.decode(ids)
  with pytest.raises(ValueError, match=r'ids\[2\]'):
    pipe.logits(ids, [0, 1])
  with pytest.raises(ValueError, match=r'ids must hold 4 arrays'):
    pipe.decode(ids[:3])
  with pytest.raises(ValueError, match=r'ids\[1\] \(scale 1, 2x2\) must have shape \(2, 4\)'):
    pipe.decode([ids[0], ids[1][:, :3]] + ids[2:])
  with pytest.raises(ValueError, match='empty batch'):
    pipe.decode([a[:0] for a in ids])
  with pytest.raises(ValueError, match='must hold integers'):
    pipe.decode([a.astype(np.float32) for a in ids])


def test_encode_rejects_images_outside_their_range_and_takes_upstreams_range(weights_dir):
  _, pipe = weights_dir
  unit = np.random.default_rng(3).random((2, 8, 8, 3)).astype(np.float32)
  upstream = unit * 2 - 1  # what the official data pipeline feeds the VQ-VAE
  with pytest.raises(ValueError, match=r'value_range=\[0, 1\].*pass value_range=\(-1, 1\)'):
    pipe.encode(upstream)
  for a, b in zip(pipe.encode(upstream, value_range=(-1, 1)), pipe.encode(unit)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='NaN or infinite'):
    pipe.encode(np.full((1, 8, 8, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match='empty batch'):
    pipe.encode(np.zeros((0, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match='value_range must be'):
    pipe.encode(unit, value_range=(1, 0))


def test_sample_rejects_empty_and_out_of_range_labels(weights_dir):
  _, pipe = weights_dir
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='labels is empty'):
    pipe.sample(key, labels=[])
  with pytest.raises(ValueError, match=r'labels must be in \[0, 3\] \(3 = the null class\)'):
    pipe.sample(key, labels=[0, 4])
  with pytest.raises(ValueError, match='batch_size'):
    pipe.sample(key, batch_size=0)
  with pytest.raises(ValueError, match='top_p'):
    pipe.sample(key, labels=[0], top_p=float('nan'))


def test_sample_reads_top_p_zero_as_off_like_upstream(weights_dir):
  _, pipe = weights_dir
  key = jax.random.key(5)
  off = pipe.sample(key, labels=[0, 2], top_p=0.0, cfg=1.0)
  full = pipe.sample(key, labels=[0, 2], top_p=1.0, cfg=1.0)
  for a, b in zip(off.ids, full.ids):
    np.testing.assert_array_equal(a, b)
