"""Specification of the VAR / MVAR transformer (transformer.py, attention.py) and its converter.

The port must compute what the official PyTorch model computes on the same weights. The
reference is tests/torch_mvar.py, a functional torch recomputation written from the formulas;
weights travel flax -> torch through `convert.params_to_state_dict`, so the naming rule and the
transposes are under test as well. Every comparison first RANDOMISES all parameters at O(1)
scale: at init the AdaLN gammas are ~1e-5, every block is nearly the identity, and a comparison
of freshly initialised models would prove nothing.
"""

import functools
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import serialization

from mvar_jax import convert, weight_grads
from mvar_jax import transformer as tfm
from mvar_jax.attention import AttentionConfig
import torch_mvar  # tests/torch_mvar.py (pytest puts tests/ on the path)

# (patch_nums, refine_step, kernel_size): the last one or two scales use neighbourhood attention.
SMALL = ((1, 2, 3, 4, 6), 3, 3)  # 4x4 and 6x6 maps with a 3x3 window
MEDIUM = ((1, 2, 3, 4, 5, 6, 8), 5, 5)  # 6x6 and 8x8 maps with a 5x5 window
LN_100 = math.log(100.0)
# One batch size throughout, so that tests share jit compilations (compiling dominates the run).
BATCH = 2


def tiny_config(mode='mvar', scales=SMALL, **overrides):
  patch_nums, refine_step, kernel_size = scales
  kwargs = dict(depth=2, width=64, num_heads=4, num_classes=10, vocab_size=64, cvae=8,
                patch_nums=patch_nums,
                attention=AttentionConfig(mode=mode, refine_step=refine_step,
                                          kernel_size=kernel_size, implementation='gather'))
  kwargs.update(overrides)
  return tfm.TransformerConfig(**kwargs).validate()


def abstract_params(config):
  return nn.unbox(jax.eval_shape(lambda: tfm.init_params(config, jax.random.key(0)))['params'])


def random_params(config, seed, std=0.5):
  """Every parameter random at O(1) scale, far from the near-identity init.

  Kernels are N(0, 1/fan_in) so activations keep their size through the layers (the
  comparisons then test the formulas, not fp32 rounding of values in the hundreds); all
  other parameters (embeddings, biases, hence the AdaLN gammas) are N(0, std^2). Per-head
  scale_mul is around ln 4, with head 0 of every block above ln 100 so that the clamp matters.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'scale_mul_1H11':
      value = math.log(4.0) + 0.5 * rng.standard_normal(leaf.shape)
      value[0, 0] = LN_100 + 1.0
    elif name == 'kernel':
      value = rng.standard_normal(leaf.shape) / math.sqrt(leaf.shape[0])
    else:
      value = std * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


def teacher_input(config, seed, batch, first, last):
  """Random teacher inputs of scales first..last (without the class token when first == 0)."""
  begin, end = config.layout.span(first, last)
  n = end - begin - (config.layout.patch_nums[0] ** 2 if first == 0 else 0)
  x = np.random.default_rng(seed).standard_normal((batch, n, config.cvae))
  return jnp.asarray(x, jnp.float32) if n else None


def labels(config, seed, batch):
  return jnp.asarray(np.random.default_rng(seed).integers(0, config.num_classes, batch), jnp.int32)


@functools.partial(jax.jit, static_argnames=('config', 'first', 'last', 'train'))
def _jit_logits(params, label_B, x_BlCv, dropout_key, *, config, first, last, train):
  rngs = None if dropout_key is None else {'dropout': dropout_key}
  return tfm.MVARTransformer(config).apply({'params': params}, label_B, x_BlCv, first=first,
                                           last=last, train=train, rngs=rngs)


def logits(config, params, label_B, x_BlCv, first=0, last=None, *, train=False, dropout_key=None):
  """MVARTransformer.apply under jit (one compilation per config and segment)."""
  last = config.layout.num_scales - 1 if last is None else last
  return _jit_logits(params, label_B, x_BlCv, dropout_key, config=config, first=first, last=last,
                     train=train)


def torch_state_dict(params):
  """Official key names and layouts, as float64 torch tensors."""
  return {k: torch.from_numpy(np.ascontiguousarray(v, np.float64))
          for k, v in convert.params_to_state_dict(params).items()}


def to_torch(x):
  return None if x is None else torch.from_numpy(np.asarray(x, np.float64))


def max_abs_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_tree(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].shape == fb[k].shape, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope='module')
def torch_diffs(request):
  """Collects the max |flax - torch| of each comparison and prints them after the module."""
  diffs = {}
  yield diffs
  plugins = request.config.pluginmanager
  reporter, capture = plugins.get_plugin('terminalreporter'), plugins.get_plugin('capturemanager')
  if reporter is None or capture is None or not diffs:
    return
  with capture.global_and_fixture_disabled():  # print past pytest's output capture
    reporter.write_line('')
    for name, d in sorted(diffs.items()):
      reporter.write_line(f'  max |flax - torch| {name}: {d:.2e}')


# ----------------------------------------------------------------------------------------
# Size: the official presets have the published parameter counts.

@pytest.mark.parametrize('depth,count,unit,digits', [
    (16, 310.28, 1e6, 2),
    (20, 600.92, 1e6, 2),  # published as 600.9M
    (24, 1.033, 1e9, 3),
    (30, 2.010, 1e9, 3),
])
def test_preset_parameter_counts(depth, count, unit, digits):
  n = tfm.count_params(abstract_params(tfm.preset(depth)))
  assert round(n / unit, digits) == pytest.approx(count)


# ----------------------------------------------------------------------------------------
# Equality with the torch recomputation, from the same random weights.

@pytest.mark.parametrize('mode,scales', [('mvar', SMALL), ('mvar', MEDIUM), ('var', SMALL)])
def test_one_block_equals_torch(mode, scales, torch_diffs):
  config = tiny_config(mode, scales)
  params = random_params(config, seed=1)
  sd = torch_state_dict(params)
  layout, rng = config.layout, np.random.default_rng(2)
  last = layout.num_scales - 1
  x_BLC = rng.standard_normal((BATCH, layout.total_len, config.width)).astype(np.float32)
  cond_BD = rng.standard_normal((BATCH, config.width)).astype(np.float32)

  block = jax.jit(lambda p, x, c: tfm.AdaLNSelfAttn(config).apply({'params': p}, x, c, 0, last))
  out = block(params['blocks_1'], x_BLC, cond_BD)
  mask = torch_mvar.attention_mask(layout.patch_nums, 0, last, mode,
                                   config.attention.refine_step, config.attention.kernel_size)
  expected = torch_mvar.block(sd, 1, to_torch(x_BLC), to_torch(cond_BD), mask)

  diff = max_abs_diff(out, expected)
  torch_diffs[f'block {mode} {layout.patch_nums}'] = diff
  assert diff < 1e-4
  # The block is far from the identity, so the comparison above means something.
  assert float(np.std(np.asarray(out) - x_BLC)) > 0.3


def official_segments(config):
  """Small scales together, then each large scale alone (the MVAR training schedule)."""
  r, k = config.attention.refine_step, config.layout.num_scales
  return [(0, r - 1)] + [(s, s) for s in range(r, k)]


@pytest.mark.parametrize('mode,scales', [('mvar', SMALL), ('mvar', MEDIUM), ('var', SMALL)])
def test_model_logits_equal_torch(mode, scales, torch_diffs):
  config = tiny_config(mode, scales)
  params = random_params(config, seed=3)
  sd = torch_state_dict(params)
  k = config.layout.num_scales
  if mode == 'var':
    segments = [(0, k - 1), (0, 2)]  # 'var' segments are prefixes
  elif scales == SMALL:
    # All scales; the official training segments; a segment starting past scale 0 that spans
    # both the block-diagonal and the neighbourhood scales.
    segments = [(0, k - 1)] + official_segments(config) + [(2, k - 1)]
  else:
    segments = [(0, k - 1), (2, k - 1)]
  for seed, (first, last) in enumerate(segments):
    label_B = labels(config, seed, BATCH)
    x_BlCv = teacher_input(config, seed, BATCH, first, last)
    out = logits(config, params, label_B, x_BlCv, first, last)
    expected = torch_mvar.forward(
        sd, torch.from_numpy(np.asarray(label_B, np.int64)), to_torch(x_BlCv),
        patch_nums=config.patch_nums, first=first, last=last, mode=mode,
        refine_step=config.attention.refine_step, kernel_size=config.attention.kernel_size)
    assert out.shape == expected.shape == (BATCH, np.diff(config.layout.span(first, last))[0],
                                           config.vocab_size)
    diff = max_abs_diff(out, expected)
    torch_diffs[f'model {mode} {config.patch_nums} scales {first}..{last}'] = diff
    assert diff < 1e-4, (first, last)
    assert float(np.std(np.asarray(out))) > 0.1  # logits of O(1), not a near-constant


@pytest.mark.parametrize('case', ['7x7_k7', '13x13_k7', '16x16_k7', '6x6_k5'])
def test_torch_neighbourhood_mask_is_natten(case):
  """The torch reference's window rule gives NATTEN's na2d outputs (recorded in
  tests/fixtures/natten_na2d.npz by tests/make_natten_fixtures.py)."""
  with np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'natten_na2d.npz')) as f:
    q, k, v, out = (torch.from_numpy(f[f'{case}__{x}']) for x in ('q', 'k', 'v', 'out'))
    kernel_size, scale = int(f[f'{case}__kernel_size']), float(f[f'{case}__scale'])
  batch, n, _, heads, head_dim = q.shape
  flat_BhND = lambda t: t.reshape(batch, n * n, heads, head_dim).transpose(1, 2)
  logits = scale * flat_BhND(q) @ flat_BhND(k).transpose(-1, -2)
  logits = logits.masked_fill(~torch_mvar.neighborhood_mask(n, kernel_size), float('-inf'))
  expected = (torch.softmax(logits, -1) @ flat_BhND(v)).transpose(1, 2)
  assert max_abs_diff(out.reshape(batch, n * n, heads, head_dim), expected) < 1e-5


# ----------------------------------------------------------------------------------------
# Markov property and segment independence.

def per_scale(config, logits_BLV, first=0):
  return config.layout.split(np.asarray(logits_BLV), first, config.layout.num_scales - 1)


@pytest.mark.parametrize('mode', ['mvar', 'var'])
def test_perturbing_one_scale_changes_only_what_may_see_it(mode):
  """'mvar': a scale's logits depend only on its own input; 'var': on every earlier one too."""
  config = tiny_config(mode)
  params = random_params(config, seed=4)
  layout, k = config.layout, config.layout.num_scales
  label_B = labels(config, 5, BATCH)
  x_BlCv = teacher_input(config, 6, BATCH, 0, k - 1)
  base = per_scale(config, logits(config, params, label_B, x_BlCv))
  first_l = layout.patch_nums[0] ** 2
  for s in range(1, k):
    lo, hi = layout.begin(s) - first_l, layout.end(s) - first_l
    x_new = x_BlCv.at[:, lo:hi].add(1.0)
    new = per_scale(config, logits(config, params, label_B, x_new))
    for t in range(k):
      changed = t == s if mode == 'mvar' else t >= s
      diff = max_abs_diff(new[t], base[t])
      assert (diff > 1e-3) if changed else (diff < 1e-6), (mode, s, t, diff)


def test_mvar_all_scales_equal_per_scale_and_official_segments():
  config = tiny_config('mvar')
  params = random_params(config, seed=7)
  k = config.layout.num_scales
  label_B = labels(config, 8, BATCH)
  x_BlCv = teacher_input(config, 9, BATCH, 0, k - 1)
  whole = logits(config, params, label_B, x_BlCv)
  first_l = config.layout.patch_nums[0] ** 2

  def run(first, last):
    begin, end = config.layout.span(first, last)
    x = x_BlCv[:, max(begin - first_l, 0):end - first_l]
    return logits(config, params, label_B, x if x.shape[1] else None, first, last)

  by_scale = jnp.concatenate([run(s, s) for s in range(k)], axis=1)
  by_segment = jnp.concatenate([run(a, b) for a, b in official_segments(config)], axis=1)
  np.testing.assert_allclose(by_scale, whole, atol=1e-5, rtol=0)
  np.testing.assert_allclose(by_segment, whole, atol=1e-5, rtol=0)


def test_var_needs_the_whole_prefix():
  config = tiny_config('var')
  params = random_params(config, seed=10)
  x = teacher_input(config, 11, 1, 1, 2)
  with pytest.raises(ValueError, match='start at scale 0'):
    logits(config, params, labels(config, 12, 1), x, first=1, last=2)


def test_segment_bounds_and_input_length_are_checked():
  config = tiny_config()
  params = random_params(config, seed=13)
  label_B = labels(config, 14, 1)
  with pytest.raises(ValueError, match='first <= last'):
    logits(config, params, label_B, teacher_input(config, 15, 1, 2, 2), first=3, last=2)
  with pytest.raises(ValueError, match='hold'):
    logits(config, params, label_B, teacher_input(config, 15, 1, 2, 3), first=2, last=2)


# ----------------------------------------------------------------------------------------
# Configuration errors name the field.

@pytest.mark.parametrize('overrides,field', [
    (dict(attention=AttentionConfig(kernel_size=4, refine_step=3)), 'kernel_size'),
    # refine_step 3 is the 4x4 map: a 5x5 window does not fit.
    (dict(attention=AttentionConfig(kernel_size=5, refine_step=3)), 'refine_step'),
    (dict(attention=AttentionConfig(kernel_size=3, refine_step=6)), 'refine_step'),
    (dict(attention=AttentionConfig(kernel_size=3, refine_step=-1)), 'refine_step'),
    (dict(attention=AttentionConfig(mode='causal')), 'mode'),
    (dict(width=66), 'width'),
    (dict(dtype='float64'), 'dtype'),
    (dict(cond_drop_rate=1.0), 'cond_drop_rate'),
    (dict(grad_boundaries='yes'), 'grad_boundaries'),
    (dict(transposed_weight_grads=True), 'transposed_weight_grads'),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    tiny_config(**overrides)


def test_kernel_larger_than_the_map_names_kernel_size():
  with pytest.raises(ValueError, match=r'kernel_size 5 is larger than the 4x4 map'):
    tiny_config(attention=AttentionConfig(kernel_size=5, refine_step=3))


# ----------------------------------------------------------------------------------------
# Training-time randomness.

def test_class_dropout_replaces_labels_by_the_null_class_at_the_configured_rate():
  rate, batch = 0.25, 4000
  config = tiny_config(cond_drop_rate=rate, drop_path_rate=0.0)
  params = random_params(config, seed=16)
  label_B = labels(config, 17, batch)
  # Scale 0 alone (the class token) is a function of the condition only.
  dropped = logits(config, params, label_B, None, 0, 0, train=True,
                   dropout_key=jax.random.key(18))
  kept = logits(config, params, label_B, None, 0, 0)
  null = logits(config, params, jnp.full_like(label_B, config.num_classes), None, 0, 0)
  is_kept = np.all(np.isclose(dropped, kept, atol=1e-6, rtol=0), axis=(1, 2))
  is_null = np.all(np.isclose(dropped, null, atol=1e-6, rtol=0), axis=(1, 2))
  assert np.all(is_kept ^ is_null)  # every sample is one or the other, never both
  # Binomial(4000, 0.25): standard deviation 0.007.
  assert abs(is_null.mean() - rate) < 0.03


def test_train_without_dropout_is_the_inference_forward():
  config = tiny_config(cond_drop_rate=0.0, drop_path_rate=0.0)
  params = random_params(config, seed=19)
  label_B, x = labels(config, 20, BATCH), teacher_input(config, 21, BATCH, 0, 4)
  train = logits(config, params, label_B, x, train=True, dropout_key=jax.random.key(0))
  np.testing.assert_array_equal(train, logits(config, params, label_B, x))


@pytest.mark.parametrize('mode,first,last', [('mvar', 0, 4), ('mvar', 3, 3), ('var', 0, 4)])
def test_blocks_run_as_a_loop_give_the_unrolled_logits(mode, first, last):
  config = tiny_config(mode, depth=6)  # two branches of three blocks
  params = random_params(config, seed=23)
  label_B, x = labels(config, 24, BATCH), teacher_input(config, 25, BATCH, first, last)
  looped = jax.jit(lambda p, l, x: tfm.MVARTransformer(config).apply(
      {'params': p}, l, x, first=first, last=last, loop_blocks=True))(params, label_B, x)
  np.testing.assert_allclose(looped, logits(config, params, label_B, x, first, last),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='loop_blocks'):
    tfm.MVARTransformer(config).apply({'params': params}, label_B, x, first=first, last=last,
                                      train=True, loop_blocks=True)


@pytest.mark.parametrize('mode,first,last,loop', [('mvar', 0, 4, False), ('mvar', 3, 3, True),
                                                  ('var', 0, 4, True)])
def test_precomputed_block_modulations_give_the_same_logits(mode, first, last, loop):
  config = tiny_config(mode, depth=2)
  params = random_params(config, seed=31)
  label_B, x = labels(config, 32, BATCH), teacher_input(config, 33, BATCH, first, last)
  model = tfm.MVARTransformer(config)
  mods = model.apply({'params': params}, label_B, method='block_modulations')
  assert [m.shape for m in mods] == [(BATCH, 6 * config.width)] * config.depth
  given = jax.jit(lambda p, l, x, m: model.apply(
      {'params': p}, l, x, first=first, last=last, loop_blocks=loop, block_modulations=m))(
          params, label_B, x, mods)
  np.testing.assert_allclose(given, logits(config, params, label_B, x, first, last),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='block_modulations is for inference'):
    model.apply({'params': params}, label_B, x, first=first, last=last, train=True,
                block_modulations=mods, rngs={'dropout': jax.random.key(0)})
  with pytest.raises(ValueError, match=r'block_modulations: need one per block \(2\), got 1'):
    model.apply({'params': params}, label_B, x, first=first, last=last,
                block_modulations=mods[:1])


def test_drop_path_is_random_in_training_and_off_in_inference():
  config = tiny_config(cond_drop_rate=0.0, drop_path_rate=0.5)
  params = random_params(config, seed=22)
  label_B, x = labels(config, 23, BATCH), teacher_input(config, 24, BATCH, 0, 4)
  infer = logits(config, params, label_B, x)
  np.testing.assert_array_equal(infer, logits(config, params, label_B, x))  # deterministic
  run = lambda seed: logits(config, params, label_B, x, train=True,
                            dropout_key=jax.random.key(seed))
  np.testing.assert_array_equal(run(1), run(1))  # reproducible from the key
  assert max_abs_diff(run(1), infer) > 1e-3


# ----------------------------------------------------------------------------------------
# Dense attention (MVAR below refine_step, VAR's queries) runs in groups of scales: the same
# values, less work.

def test_dense_groups_give_every_map_of_64_tokens_its_own_attention():
  from mvar_jax import attention
  from mvar_jax.layout import ScaleLayout
  layout = ScaleLayout((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
  assert attention.dense_groups(layout, 0, 7) == [(0, 5), (6, 6), (7, 7)]
  assert attention.dense_groups(layout, 2, 6) == [(2, 5), (6, 6)]
  assert attention.dense_groups(layout, 3, 5) == [(3, 5)]
  assert attention.dense_groups(layout, 7, 7) == [(7, 7)]
  assert attention.dense_groups(layout, 8, 7) == []  # no dense scale: multiscale_attention relies on it
  for first in range(10):  # every segment: contiguous groups covering it exactly
    for last in range(first, 10):
      groups = attention.dense_groups(layout, first, last)
      assert [g[0] for g in groups] == [first] + [g[1] + 1 for g in groups[:-1]]
      assert groups[-1][1] == last


@pytest.mark.parametrize('mode,first,last', [('mvar', 0, 4), ('mvar', 1, 3), ('mvar', 3, 4),
                                             ('var', 0, 4), ('var', 0, 3)])
def test_grouped_dense_attention_is_the_masked_attention(mode, first, last):
  from mvar_jax import attention
  from mvar_jax.kernels.neighborhood_attention import reference as na_reference
  from mvar_jax.layout import ScaleLayout
  layout = ScaleLayout((1, 2, 4, 8, 10))  # 8x8 and 10x10 attend alone
  config = AttentionConfig(mode=mode, refine_step=5, kernel_size=3)
  assert len(attention.dense_groups(layout, first, last)) > 1
  begin, end = layout.span(first, last)
  q, k, v = (jax.random.normal(jax.random.key(i), (BATCH, end - begin, 2, 8)) for i in range(3))
  grouped = attention.multiscale_attention(q, k, v, layout=layout, first=first, last=last,
                                           config=config, scale=0.3)
  mask = jnp.asarray(attention.block_mask(layout, first, last, mode))
  np.testing.assert_allclose(grouped, na_reference.masked_dense_attention(q, k, v, mask, scale=0.3),
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# The backward pass: grad boundaries between blocks and transposed weight gradients change how
# XLA compiles it, not its values.

@pytest.mark.parametrize('field', ['grad_boundaries', 'transposed_weight_grads'])
@pytest.mark.parametrize('mode,first,last', [('mvar', 0, 3), ('mvar', 4, 4), ('var', 0, 4)])
def test_backward_settings_change_neither_the_loss_nor_the_gradient(field, mode, first, last):
  results = []
  for setting in ('off', 'on'):
    config = tiny_config(mode, depth=3, drop_path_rate=0.3, **{field: setting})
    params = random_params(config, seed=26)
    label_B, x = labels(config, 27, BATCH), teacher_input(config, 28, BATCH, first, last)

    def loss(p, config=config, label_B=label_B, x=x):
      out = tfm.MVARTransformer(config).apply(
          {'params': p}, label_B, x, first=first, last=last, train=True,
          rngs={'dropout': jax.random.key(29)})  # the same class and path drops for both
      return jnp.mean(jax.nn.log_softmax(out)[..., 0])

    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss_off, grads_off), (loss_on, grads_on) = results
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
  flat_off = jax.tree_util.tree_leaves_with_path(grads_off)
  for (path, g_off), g_on in zip(flat_off, jax.tree_util.tree_leaves(grads_on)):
    np.testing.assert_allclose(g_on, g_off, rtol=1e-4, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  assert max(float(jnp.abs(g).max()) for _, g in flat_off) > 1e-3  # a gradient, not zeros


def test_a_grad_boundary_passes_every_cotangent_on_unchanged_nan_included():
  x = jnp.arange(6.0).reshape(2, 3)
  for cotangent in (jnp.full((2, 3), 2.5), jnp.array([[jnp.nan, 1, 2], [3, jnp.inf, -4]])):
    y, vjp = jax.vjp(tfm.grad_boundary, x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(vjp(cotangent)[0], cotangent)  # NaN == NaN here


def test_grad_boundaries_auto_are_on_for_cpu_and_gpu_only(monkeypatch):
  assert tfm.use_grad_boundaries('on') and not tfm.use_grad_boundaries('off')
  for backend, expected in (('cpu', True), ('gpu', True), ('tpu', False)):
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    assert tfm.use_grad_boundaries('auto') is expected, backend


def test_transposed_weight_grads_auto_are_on_for_cpu_only(monkeypatch):
  use = weight_grads.use_transposed_weight_grads
  assert use('on') and not use('off')
  for backend, expected in (('cpu', True), ('gpu', False), ('tpu', False)):
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    assert use('auto') is expected, backend


@pytest.mark.parametrize('dtype,preferred', [(jnp.float32, None), (jnp.float32, jnp.float32),
                                             (jnp.bfloat16, jnp.float32)])
def test_the_dense_matmul_has_autodiffs_value_and_gradients(dtype, preferred):
  x = jax.random.normal(jax.random.key(0), (2, 5, 3), dtype)
  w = jax.random.normal(jax.random.key(1), (3, 6), dtype)  # widening: takes the custom VJP
  dims = (((2,), (0,)), ((), ()))

  def loss(dot, x, w):
    y = dot(x, w, dims, preferred_element_type=preferred)
    return jnp.sum(y.astype(jnp.float32) * jnp.arange(6.0))

  assert 'custom_vjp' in str(jax.make_jaxpr(
      functools.partial(loss, weight_grads.dense_dot_general))(x, w))
  ours = jax.value_and_grad(functools.partial(loss, weight_grads.dense_dot_general), (0, 1))
  ref = jax.value_and_grad(functools.partial(loss, jax.lax.dot_general), (0, 1))
  (v, (dx, dw)), (v_ref, (dx_ref, dw_ref)) = ours(x, w), ref(x, w)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(v, v_ref, rtol=tol)
  assert dx.dtype == dtype and dw.dtype == dtype and dw.shape == w.shape
  np.testing.assert_allclose(np.float32(dx), np.float32(dx_ref), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.float32(dw), np.float32(dw_ref), rtol=tol, atol=tol)


def test_dots_other_than_a_dense_layers_pass_through_to_lax():
  x, w = jnp.ones((2, 4, 3)), jnp.ones((2, 3, 5))
  batched = (((2,), (1,)), ((0,), (0,)))
  jaxpr = str(jax.make_jaxpr(lambda x, w: weight_grads.dense_dot_general(x, w, batched))(x, w))
  assert 'custom_vjp' not in jaxpr and 'dot_general' in jaxpr
  dense = (((2,), (0,)), ((), ()))
  jaxpr = str(jax.make_jaxpr(lambda x, w: weight_grads.dense_dot_general(x, w[0], dense))(x, w))
  assert 'custom_vjp' in jaxpr  # (3 -> 5): a layer at least as wide as its input
  narrowing = jnp.ones((5, 3))
  jaxpr = str(jax.make_jaxpr(lambda x: weight_grads.dense_dot_general(x, narrowing, dense))(w))
  assert 'custom_vjp' not in jaxpr  # (5 -> 3), as fc2: autodiff's dot


def _transposed_lhs_dots(hlo_text: str) -> list[str]:
  """Op names of the compiled program's unbatched dots that contract their lhs's axis 0."""
  return [re.search(r'op_name="([^"]*)"', line).group(1)
          for line in re.findall(r'^.* dot\(.*$', hlo_text, re.M)
          if 'lhs_batch_dims' not in line and 'lhs_contracting_dims={0}' in line]


def test_transposed_weight_grads_leave_no_transposed_dot_in_the_layers_backward():
  """XLA:CPU runs a dot that contracts its lhs's rows at ~60% of its GEMM rate; with the
  setting on, no weight gradient of qkv, proj, fc1 or the head compiles to one (fc2, whose
  input is 4x wider than its output, keeps autodiff's dot: it ran at full rate)."""
  layers = ('mat_qkv', 'proj', 'fc1', 'fc2', 'head/')
  found = {}
  for setting in ('off', 'on'):
    config = tiny_config('mvar', depth=2, transposed_weight_grads=setting)
    params = random_params(config, seed=30)
    label_B, x = labels(config, 31, BATCH), teacher_input(config, 32, BATCH, 0, 3)

    def loss(p, config=config, label_B=label_B, x=x):
      return jnp.mean(tfm.MVARTransformer(config).apply(
          {'params': p}, label_B, x, first=0, last=3, train=True,
          rngs={'dropout': jax.random.key(33)}))

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    found[setting] = [n for n in _transposed_lhs_dots(hlo) if any(l in n for l in layers)]
  # Without: one per layer and block, plus the head (if XLA stops emitting them, this fails
  # and says the setting can go).
  assert len(found['off']) == 4 * 2 + 1, found['off']
  assert len(found['on']) == 2 and all('fc2' in name for name in found['on']), found['on']


# ----------------------------------------------------------------------------------------
# Initialisation (training from scratch).

def test_a_config_with_a_list_of_patch_nums_is_the_tuple_config():
  """JSON and user literals give lists; the config stays hashable (a jit static argument)."""
  listed = tfm.TransformerConfig(depth=1, width=32, num_heads=2, patch_nums=[1, 2, 3])
  tupled = tfm.TransformerConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2, 3))
  assert listed == tupled and hash(listed) == hash(tupled)
  shapes = jax.eval_shape(lambda: tfm.init_params(listed, jax.random.key(0)))
  assert nn.unbox(shapes)['params']['pos_1LC'].shape == (1, 14, 32)


def test_init_statistics_follow_the_official_recipe():
  depth, width, vocab = 3, 256, 1024
  config = tiny_config(depth=depth, width=width, num_heads=4, vocab_size=vocab,
                       num_classes=100)
  # The 'rbg' generator compiles much faster than threefry; the statistics are the same.
  params = nn.unbox(tfm.init_params(config, jax.random.key(25, impl='rbg'))['params'])
  std = math.sqrt(1 / (3 * width))
  close = lambda x, target, rel=0.05: abs(float(np.std(x)) - target) < rel * target

  assert close(params['head']['kernel'], 0.02 * std)
  assert close(params['head_nm']['ada_lin']['kernel'], 0.5 * std)
  assert close(params['word_embed']['kernel'], std, rel=0.15)
  assert close(params['class_emb']['embedding'], std)
  assert close(params['pos_1LC'], std)
  assert close(params['pos_start'], std, rel=0.2)
  for i in range(depth):
    block = params[f'blocks_{i}']
    ada = np.asarray(block['ada_lin']['kernel'])  # (D, 6C): gamma1, gamma2, then the rest
    assert close(ada[:, :2 * width], 1e-5 * std)
    assert close(ada[:, 2 * width:], 0.5 * std)
    assert close(block['attn']['mat_qkv']['kernel'], std)
    assert close(block['ffn']['fc1']['kernel'], std)
    assert close(block['attn']['proj']['kernel'], std / math.sqrt(2 * depth))
    assert close(block['ffn']['fc2']['kernel'], std / math.sqrt(2 * depth))
    np.testing.assert_allclose(block['attn']['scale_mul_1H11'], math.log(4.0), rtol=1e-6)
  biases = {k: v for k, v in flat(params).items()
            if k.endswith(('bias', 'q_bias', 'v_bias'))}
  assert len(biases) == 2 + depth * 6 + 1  # word_embed, head_nm; ada_lin, q, v, proj, fc1, fc2
  for name, b in biases.items():
    assert not np.any(b), name


# ----------------------------------------------------------------------------------------
# Reduced precision.

def test_bfloat16_compute_stays_close_to_float32():
  config = tiny_config()
  params = random_params(config, seed=26)
  label_B, x = labels(config, 27, BATCH), teacher_input(config, 28, BATCH, 0, 4)
  ref = np.asarray(logits(config, params, label_B, x))
  low = logits(tiny_config(dtype='bfloat16'), params, label_B, x)
  assert low.dtype == jnp.float32  # logits come back in fp32
  rel = np.linalg.norm(np.asarray(low) - ref) / np.linalg.norm(ref)
  assert 0 < rel < 2e-2  # about 8e-3 observed


# ----------------------------------------------------------------------------------------
# Converter: official state dicts <-> flax params.

def numpy_state_dict(params):
  return {k: np.array(v, np.float32) for k, v in convert.params_to_state_dict(params).items()}


def test_state_dict_round_trip_is_exact():
  config = tiny_config()
  params = random_params(config, seed=29)
  sd = numpy_state_dict(params)
  assert sd['blocks.1.attn.mat_qkv.weight'].shape == (3 * config.width, config.width)  # (out, in)
  assert sd['blocks.0.ada_lin.1.weight'].shape == (6 * config.width, config.width)
  assert sd['head_nm.ada_lin.1.weight'].shape == (2 * config.width, config.width)
  assert sd['pos_start'].shape == (1, 1, config.width)
  _, back = convert.convert_transformer(sd, config=config)
  assert_same_tree(back, params)


def test_buffers_of_the_official_modules_are_ignored():
  config = tiny_config()
  params = random_params(config, seed=30)
  sd = numpy_state_dict(params)
  total = config.layout.total_len
  sd['lvl_1L'] = np.zeros((1, total), np.float32)
  sd['attn_bias_for_masking'] = np.zeros((1, 1, total, total), np.float32)
  for i in range(config.depth):
    sd[f'blocks.{i}.attn.zero_k_bias'] = np.zeros(config.width, np.float32)
  _, back = convert.convert_transformer(sd, config=config)
  assert_same_tree(back, params)


@pytest.mark.parametrize('wrap', [
    lambda sd: sd,
    lambda sd: {'mvar_wo_ddp': sd},
    lambda sd: {'trainer': {'mvar_wo_ddp': sd}, 'args': {'lr': 1e-4}},
])
def test_release_files_and_training_checkpoints_are_both_read(wrap):
  config = tiny_config()
  params = random_params(config, seed=31)
  sd = numpy_state_dict(params)
  extracted = convert.extract_state_dict(wrap({k: torch.from_numpy(v) for k, v in sd.items()}))
  assert extracted.keys() == sd.keys()
  for k, v in extracted.items():
    assert isinstance(v, np.ndarray) and v.dtype == np.float32
    np.testing.assert_array_equal(v, sd[k])
  assert_same_tree(convert.convert_transformer(extracted, config=config)[1], params)


def test_a_mismatched_state_dict_lists_every_offending_key():
  config = tiny_config()
  sd = numpy_state_dict(random_params(config, seed=32))
  del sd['blocks.1.ffn.fc2.bias']
  sd['blocks.0.attn.extra_bias'] = np.zeros(config.width, np.float32)
  sd['head.weight'] = np.zeros((config.vocab_size + 1, config.width), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.convert_transformer(sd, config=config)
  message = str(info.value)
  for expected in ('missing (1): blocks_1/ffn/fc2/bias', 'unexpected (1): blocks.0.attn.extra_bias',
                   'mis-shaped (1): head.weight (65, 64) vs expected (64, 64)'):
    assert expected in message, message
  assert info.value.missing == ['blocks_1/ffn/fc2/bias']
  assert info.value.unexpected == ['blocks.0.attn.extra_bias']


def test_the_architecture_is_read_off_the_tensor_shapes():
  config = tiny_config(depth=3, width=96, num_heads=3, num_classes=7, vocab_size=48, cvae=5)
  sd = numpy_state_dict(random_params(config, seed=33))
  inferred = convert.infer_transformer_config(sd, patch_nums=config.patch_nums,
                                              attention=config.attention)
  for field in ('depth', 'width', 'num_heads', 'num_classes', 'vocab_size', 'cvae', 'mlp_ratio',
                'patch_nums'):
    assert getattr(inferred, field) == getattr(config, field), field
  # Without patch_nums the default 680-token pyramid does not fit pos_1LC: the error says so.
  with pytest.raises(convert.CheckpointMismatchError, match='pass patch_nums'):
    convert.infer_transformer_config(sd)


def test_command_line_converts_a_pth_file(tmp_path):
  config = tiny_config()
  params = random_params(config, seed=34)
  sd = {k: torch.from_numpy(v) for k, v in numpy_state_dict(params).items()}
  sd['lvl_1L'] = torch.zeros(1, config.layout.total_len, dtype=torch.long)
  path = os.path.join(tmp_path, 'mvar_tiny.pth')
  torch.save({'mvar_wo_ddp': sd}, path)
  out = os.path.join(tmp_path, 'converted')
  convert.main(['--transformer', path, '--out', out, '--patch_nums', '1_2_3_4_6',
                '--refine_step', '3', '--kernel_size', '3'])
  with open(os.path.join(out, 'transformer.msgpack'), 'rb') as f:
    restored = serialization.msgpack_restore(f.read())
  assert_same_tree(restored, params)
  with open(os.path.join(out, 'transformer.json')) as f:
    saved = json.load(f)
  assert (saved['depth'], saved['width'], saved['num_heads']) == (2, 64, 4)
  assert tuple(saved['patch_nums']) == config.patch_nums
  assert saved['attention']['refine_step'] == 3 and saved['attention']['kernel_size'] == 3


def test_the_logits_head_runs_in_its_parameters_dtype_with_fp32_logits():
  """fp32 params: the fp32 matmul. bf16 params (inference loading): a bf16 matmul that
  accumulates in fp32, not an up-cast of the weights to an fp32 GEMM."""
  head = tfm.LogitsHead(24, tfm.trunc_normal(0.5))
  h = jax.random.normal(jax.random.key(1), (2, 5, 16))
  params = nn.unbox(head.init(jax.random.key(0), h))
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
  w, b = params['params']['kernel'], params['params']['bias']
  out32 = head.apply(params, h)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(out32, np.asarray(h) @ np.asarray(w) + np.asarray(b), rtol=1e-5,
                             atol=1e-5)
  p16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  out16 = head.apply(p16, h)
  assert out16.dtype == jnp.float32
  want = jnp.dot(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32) + b.astype(jnp.bfloat16).astype(jnp.float32)
  np.testing.assert_array_equal(out16, want)
  jaxpr = str(jax.make_jaxpr(lambda p: head.apply(p, h))(p16))
  assert 'preferred_element_type=float32' in jaxpr and 'f32[16,24]' not in jaxpr
