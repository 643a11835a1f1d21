"""The sampler: filtering semantics, guidance, determinism, input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mvar_jax import api, sampling, transformer, vqvae
from mvar_jax.attention import AttentionConfig

from test_per_shard import operand_shapes

PATCH_NUMS = (1, 2, 3, 4, 6)


def kept(logits):
  return set(np.flatnonzero(np.isfinite(np.asarray(logits).reshape(-1))).tolist())


def filter1d(values, top_k=0, top_p=1.0, impl='sort'):
  logits = jnp.asarray(values, jnp.float32)[None, None]
  return sampling.top_k_top_p_filter(logits, top_k=top_k, top_p=top_p, implementation=impl)


def torch_official_filter(logits_BlV, top_k, top_p):
  """The upstream rule, restated in torch: top-k by threshold, then top-p on sorted probs."""
  logits = logits_BlV.clone()
  if top_k > 0:
    thresh = logits.topk(top_k, dim=-1).values.amin(dim=-1, keepdim=True)
    logits[logits < thresh] = -torch.inf
  if top_p > 0:
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
    remove[..., -1] = False
    logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), -torch.inf)
  return logits


# Both thresholds: the sort (CPU/TPU) and the Pallas radix select (GPU; interpreted here).
@pytest.mark.parametrize('impl', ['sort', 'pallas'])
class TestFiltering:

  @pytest.fixture(autouse=True)
  def _interpret_pallas_on_cpu(self, monkeypatch):
    monkeypatch.setenv('MVAR_PALLAS_INTERPRET', '1')

  def test_top_k_keeps_the_k_largest(self, impl):
    assert kept(filter1d([0.1, 3.0, -1.0, 2.0, 2.5], top_k=2, impl=impl)) == {1, 4}

  def test_top_k_keeps_ties_at_the_threshold(self, impl):
    assert kept(filter1d([1.0, 2.0, 2.0, 0.0], top_k=2, impl=impl)) == {1, 2}
    assert kept(filter1d([1.0, 2.0, 2.0, 0.0], top_k=1, impl=impl)) == {1, 2}

  def test_top_k_zero_or_vocab_keeps_everything(self, impl):
    assert kept(filter1d([1.0, 2.0, 3.0], top_k=0, impl=impl)) == {0, 1, 2}
    assert kept(filter1d([1.0, 2.0, 3.0], top_k=3, impl=impl)) == {0, 1, 2}

  def test_top_p_drops_the_low_tail(self, impl):
    # probabilities 0.5, 0.3, 0.15, 0.05: ascending cumsum 0.05, 0.2, 0.5, 1.0.
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    # top_p=0.8: drop where cumsum <= 0.2 -> tokens with p=0.05 and p=0.15.
    assert kept(filter1d(logits, top_p=0.8, impl=impl)) == {0, 1}
    # top_p=0.9: drop where cumsum <= 0.1 -> only p=0.05.
    assert kept(filter1d(logits, top_p=0.9, impl=impl)) == {0, 1, 2}

  def test_top_p_always_keeps_the_max(self, impl):
    assert kept(filter1d(np.log([0.97, 0.01, 0.01, 0.01]), top_p=1e-6, impl=impl)) == {0}

  def test_top_p_one_keeps_everything(self, impl):
    assert kept(filter1d(np.log([0.4, 0.3, 0.2, 0.1]), top_p=1.0, impl=impl)) == {0, 1, 2, 3}

  def test_top_k_then_top_p_renormalises_over_the_top_k(self, impl):
    # After top-2 the survivors are 0.5 and 0.3 -> renormalised 0.625, 0.375; top_p=0.6
    # drops where cumsum <= 0.4, i.e. the 0.375 one.
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert kept(filter1d(logits, top_k=2, top_p=0.6, impl=impl)) == {0}

  @pytest.mark.parametrize('top_p,want', [(0.6, {0}), (0.95, {0, 1, 2, 3})])
  def test_ties_kept_by_top_k_count_in_the_top_p_mass(self, impl, top_p, want):
    # top-2 keeps 0.6 and all three tied 0.1s (renormalised 2/3 and 1/9 each): the ties'
    # ascending cumsums are 1/9, 2/9, 1/3; top_p=0.6 drops all three (<= 0.4), 0.95 none.
    logits = np.log([0.6, 0.1, 0.1, 0.1, 0.05, 0.05])
    assert kept(filter1d(logits, top_k=2, top_p=top_p, impl=impl)) == want
    theirs = torch_official_filter(torch.tensor(logits, dtype=torch.float32)[None, None], 2, top_p)
    assert kept(theirs.numpy()) == want

  @pytest.mark.parametrize('top_k,top_p', [(0, 0.9), (5, 1.0), (7, 0.7), (30, 0.96), (1, 0.5),
                                           (39, 0.3), (40, 0.8)])
  def test_matches_the_upstream_rule_on_random_logits(self, impl, top_k, top_p):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(3, 4, 40)).astype(np.float32) * 2
    ours = np.isfinite(np.asarray(sampling.top_k_top_p_filter(
        jnp.asarray(logits), top_k=top_k, top_p=top_p, implementation=impl)))
    theirs = torch.isfinite(torch_official_filter(torch.from_numpy(logits), top_k, top_p)).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_each_backend_compiles_the_sampler_with_its_own_xla_options():
  # GPUs: cuBLAS instead of Triton GEMMs (the FFN's GELU then lands in cuBLAS's epilogue).
  assert dict(sampling.compiler_options('gpu')) == {'xla_gpu_enable_triton_gemm': False}
  assert sampling.compiler_options('tpu') == ()
  assert not any(k.startswith('xla_gpu') for k, _ in sampling.compiler_options('cpu'))


def test_the_cpu_sampler_gives_ynnpack_the_scales_with_many_rows():
  """cpu_split: the later program starts at the first scale whose CFG rows x tokens reach
  256 (where YNNPACK's matmuls beat Eigen's on CPU)."""
  layout = transformer.preset(16).layout  # 1, 2, 3, 4, 5, 6, 8, 10, 13, 16
  large = dict(sampling._CPU_LARGE_SCALE_OPTIONS)
  assert sampling.cpu_split(layout, 2, True) == (6, large)  # 4 rows x 8x8 tokens
  assert sampling.cpu_split(layout, 32, True) == (1, large)  # 64 rows x 2x2 tokens
  assert sampling.cpu_split(layout, 1, False) == (9, large)  # 1 row x 16x16 tokens
  assert sampling.cpu_split(layout, 128, True) == (None, large)  # scale 0 already: one program
  small = transformer.TransformerConfig(patch_nums=PATCH_NUMS).layout
  assert sampling.cpu_split(small, 3, True) == (None, {})  # 6 x 36 rows at most: no YNNPACK


def test_guidance_formula():
  cond = jnp.array([[[1.0, 2.0]]])
  uncond = jnp.array([[[3.0, -1.0]]])
  out = sampling.guidance(jnp.concatenate([cond, uncond]), 0.5)
  np.testing.assert_allclose(out, 1.5 * cond - 0.5 * uncond)


@pytest.fixture(scope='module')
def pipe():
  v_cfg = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                            patch_nums=PATCH_NUMS, using_sa=False)
  t_cfg = transformer.TransformerConfig(
      depth=1, width=32, num_heads=2, vocab_size=32, cvae=8, num_classes=5, patch_nums=PATCH_NUMS,
      attention=AttentionConfig(refine_step=4, kernel_size=3)).validate()
  # unsafe_rbg: threefry init compiles slowly on CPU, and these tests need no particular values.
  v_params = vqvae.init_params(v_cfg, jax.random.key(0, impl='unsafe_rbg'))['params']
  t_params = transformer.init_params(t_cfg, jax.random.key(1, impl='unsafe_rbg'))['params']
  return api.MVARPipeline(v_cfg, v_params, t_cfg, t_params)


class TestSample:

  def test_same_key_same_images_other_key_other_ids(self, pipe):
    kw = dict(labels=[0, 3, 4], cfg=2.0, top_k=8, top_p=0.9)
    a = pipe.sample(jax.random.key(7), **kw)
    b = pipe.sample(jax.random.key(7), **kw)
    c = pipe.sample(jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.images_BHW3, b.images_BHW3)
    for x, y in zip(a.ids, b.ids):
      np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.ids, c.ids))

  def test_compile_sampler_runs_what_sample_runs(self, pipe):
    """One executable, compiled from shapes alone, for both the timing and the memory figure."""
    kw = dict(labels=[0, 3, 4], cfg=2.0, top_p=0.9)  # as above: the executable is reused
    want = pipe.sample(jax.random.key(7), top_k=8, **kw)
    shapes = lambda tree: jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    sampler = sampling.compile_sampler(
        pipe.transformer, shapes(pipe.transformer_params), pipe.tokenizer,
        shapes(pipe.tokenizer_params), batch_size=3, cfg=2.0, top_k=8)
    got = sampler(pipe.transformer_params, pipe.tokenizer_params, key=jax.random.key(7), **kw)
    for x, y in zip(want.ids, got.ids):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(want.images_BHW3, got.images_BHW3)
    # The blocks unrolled (the GPU's form; CPU loops them by default): the same samples.
    assert sampling.loops_blocks()
    unrolled = sampling.compile_sampler(
        pipe.transformer, shapes(pipe.transformer_params), pipe.tokenizer,
        shapes(pipe.tokenizer_params), batch_size=3, cfg=2.0, top_k=8, loop_blocks=False)
    assert unrolled.executable is not sampler.executable
    again = unrolled(pipe.transformer_params, pipe.tokenizer_params, key=jax.random.key(7), **kw)
    for x, y in zip(want.ids, again.ids):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(again.images_BHW3, want.images_BHW3, atol=1e-6)
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(pipe.transformer_params))
    assert sampler.memory_analysis().argument_size_in_bytes >= param_bytes
    with pytest.raises(ValueError, match=r'labels must have shape \(3,\)'):
      sampler(pipe.transformer_params, pipe.tokenizer_params, key=jax.random.key(7),
              labels=[0], cfg=2.0)
    with pytest.raises(ValueError, match='cfg=1.0: this sampler was compiled with guidance'):
      sampler(pipe.transformer_params, pipe.tokenizer_params, key=jax.random.key(7),
              labels=[0, 1, 2], cfg=1.0)

  @pytest.mark.parametrize('mode', ['mvar', 'var'])
  def test_the_sampler_computes_the_blocks_modulations_once_not_per_scale(self, pipe, mode):
    """Each block's ada_lin matrix is multiplied once per call: the modulations depend on
    the labels alone, and reading those matrices again at every scale was a third of a
    block's weight traffic at the small scales."""
    import dataclasses
    t_cfg = dataclasses.replace(pipe.transformer_config, attention=dataclasses.replace(
        pipe.transformer_config.attention, mode=mode))
    jaxpr = jax.make_jaxpr(lambda tp, vp, l, k: sampling._scale_loop(
        {'params': tp}, vp, l, k, 2.0, 0.9, transformer=transformer.MVARTransformer(t_cfg),
        vqvae=pipe.tokenizer, top_k=8, more_smooth=False, use_cfg=True))(
            pipe.transformer_params, pipe.tokenizer_params, jnp.arange(3), jax.random.key(0))
    ada_shape = (t_cfg.width, 6 * t_cfg.width)  # (C, 6C)
    # Products with an ada_lin matrix, in nested jaxprs (loops, switches) too.
    ada_dots = sum(ada_shape in shapes for shapes in operand_shapes(jaxpr, 'dot_general'))
    assert t_cfg.layout.num_scales > 1
    assert ada_dots == t_cfg.depth

  def test_xla_options_compile_their_own_program_with_the_same_samples(self, pipe):
    """A per-program XLA option (here a GPU one, which XLA:CPU accepts and ignores) is its own
    executable and cache entry; an option XLA does not know is an error naming it."""
    kw = dict(labels=[0, 3, 4], cfg=2.0, top_p=0.9)
    shapes = lambda tree: jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    # The signature the test above compiled (the same executable, from the process's cache).
    args = (pipe.transformer, shapes(pipe.transformer_params), pipe.tokenizer,
            shapes(pipe.tokenizer_params))
    plain = sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8)
    opts = sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8,
                                    xla_options={'xla_gpu_enable_triton_gemm': False})
    assert opts.executable is not plain.executable
    a, b = (s(pipe.transformer_params, pipe.tokenizer_params, key=jax.random.key(7), **kw)
            for s in (plain, opts))
    for x, y in zip(a.ids, b.ids):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.images_BHW3, b.images_BHW3)
    with pytest.raises(Exception, match='xla_no_such_option'):
      sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8,
                               xla_options={'xla_no_such_option': True})

  @pytest.mark.parametrize('mode', ['mvar', 'var'])
  def test_a_split_sampler_is_two_programs_with_the_same_samples(self, pipe, mode):
    """The scales from split_at_scale on and the decode as a second program (its own XLA
    options), continuing from the first's f_hat and teacher inputs."""
    import dataclasses
    t_cfg = dataclasses.replace(pipe.transformer_config, attention=dataclasses.replace(
        pipe.transformer_config.attention, mode=mode))
    model = transformer.MVARTransformer(t_cfg)
    args = (model, pipe.transformer_params, pipe.tokenizer, pipe.tokenizer_params)
    kw = dict(key=jax.random.key(7), labels=[0, 3, 4], cfg=2.0, top_p=0.9)
    whole = sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8)
    split = sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8, split_at_scale=3,
                                     late_xla_options={'xla_gpu_enable_triton_gemm': False})
    assert len(whole.programs) == 1 and len(split.programs) == 2
    assert split.memory_analysis() is not None
    a = whole(pipe.transformer_params, pipe.tokenizer_params, **kw)
    b = split(pipe.transformer_params, pipe.tokenizer_params, **kw)
    assert len(b.ids) == len(PATCH_NUMS)
    for x, y in zip(a.ids, b.ids):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(b.images_BHW3, a.images_BHW3, atol=1e-6)
    for bad in (0, len(PATCH_NUMS), 1.5):
      with pytest.raises(ValueError, match='split_at_scale must be an integer in'):
        sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8, split_at_scale=bad)
    with pytest.raises(ValueError, match='give split_at_scale too'):
      sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8, late_xla_options={})

  def test_the_cpu_default_splits_where_cpu_split_says_with_the_same_samples(self, pipe,
                                                                             monkeypatch):
    monkeypatch.setattr(sampling, '_CPU_DOT_MIN_ROWS', 50)  # batch 3 with CFG: scale 2 (54)
    args = (pipe.transformer, pipe.transformer_params, pipe.tokenizer, pipe.tokenizer_params)
    kw = dict(key=jax.random.key(7), labels=[0, 3, 4], cfg=2.0, top_p=0.9)
    default = sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8)
    one = sampling.compile_sampler(*args, batch_size=3, cfg=2.0, top_k=8, xla_options={})
    assert len(default.programs) == 2 and len(one.programs) == 1
    # YNNPACK's fusions in the later program only.
    head, tail = (p.as_text() for p in default.programs)
    assert '__ynn_fusion' not in head and '__ynn_fusion' in tail
    assert '__ynn_fusion' not in one.executable.as_text()
    a = one(pipe.transformer_params, pipe.tokenizer_params, **kw)
    b = default(pipe.transformer_params, pipe.tokenizer_params, **kw)
    for x, y in zip(a.ids, b.ids):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(b.images_BHW3, a.images_BHW3, atol=1e-5)

  def test_shapes_ranges_and_consistency_with_the_tokenizer(self, pipe):
    # The signature of the tests above (an executable this process already has).
    out = pipe.sample(jax.random.key(0), labels=[1, 2, 4], cfg=1.5, top_k=8, top_p=0.9)
    assert out.images_BHW3.shape == (3, pipe.image_size, pipe.image_size, 3)
    assert float(out.images_BHW3.min()) >= 0.0 and float(out.images_BHW3.max()) <= 1.0
    assert [i.shape for i in out.ids] == [(3, p * p) for p in PATCH_NUMS]
    assert all(int(i.min()) >= 0 and int(i.max()) < 32 for i in out.ids)
    # The images are exactly the tokenizer's decoding of the sampled ids.
    np.testing.assert_allclose(pipe.decode(out.ids), out.images_BHW3, atol=1e-5)

  def test_decoding_in_chunks_gives_the_same_images(self, pipe):
    # top_k=0, top_p=1: the sampler without either filter.
    kw = dict(key=jax.random.key(5), labels=jnp.array([0, 1, 2], jnp.int32), cfg=1.5, top_k=0,
              top_p=1.0)
    args = (pipe.transformer, pipe.transformer_params, pipe.tokenizer, pipe.tokenizer_params)
    whole = sampling.sample(*args, decode_batch=0, **kw)
    chunked = sampling.sample(*args, decode_batch=2, **kw)  # chunks of 2, the last one padded
    for x, y in zip(whole.ids, chunked.ids):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(chunked.images_BHW3, whole.images_BHW3, atol=1e-6)
    with pytest.raises(ValueError, match='decode_batch must be an integer >= 0'):
      sampling.sample(*args, decode_batch=-1, **kw)

  def test_leading_decoder_stages_on_the_whole_batch_give_the_same_images(self, pipe):
    tok, params = pipe.tokenizer, pipe.tokenizer_params
    f_hat = jax.random.normal(jax.random.key(0), (5, PATCH_NUMS[-1], PATCH_NUMS[-1], 8))
    whole = np.asarray(sampling.decode_in_chunks(tok, params, f_hat, 0))
    assert np.abs(whole).max() <= 1.0
    n = vqvae.num_decoder_stages(tok.config)
    for stages in (0, 1, n - 1):  # chunks of 2, the last padded
      np.testing.assert_allclose(sampling.decode_in_chunks(tok, params, f_hat, 2, stages),
                                 whole, rtol=0, atol=1e-5)  # fp32 rounding of other batch sizes
    # 256 px: the 16, 32 and 64 px stages run whole, 128 px and up in chunks.
    assert sampling.whole_batch_decoder_stages(vqvae.VQVAEConfig()) == 3

  def test_top_k_one_is_greedy_and_ignores_the_key(self, pipe):
    # Two labels, no guidance, top-k 1: the executable of the greedy tests below.
    a = pipe.sample(jax.random.key(1), labels=[2, 0], cfg=1.0, top_k=1)
    b = pipe.sample(jax.random.key(2), labels=[2, 0], cfg=1.0, top_k=1)
    for x, y in zip(a.ids, b.ids):
      np.testing.assert_array_equal(x, y)

  def test_random_labels_are_in_range_and_reproducible(self, pipe):
    # The labels are drawn outside the sampler: the greedy tests' executable serves.
    a, b, c = (pipe.sample(jax.random.key(k), batch_size=2, cfg=1.0, top_k=1) for k in (3, 3, 4))
    np.testing.assert_array_equal(a.labels_B, b.labels_B)
    draws = np.concatenate([a.labels_B, c.labels_B])
    assert draws.shape == (4,) and 0 <= int(draws.min()) and int(draws.max()) < 5

  def test_more_smooth_runs_and_stays_in_range(self, pipe):
    out = pipe.sample(jax.random.key(4), labels=[0, 1], cfg=2.0, more_smooth=True)
    assert np.isfinite(np.asarray(out.images_BHW3)).all()

  @pytest.mark.parametrize('mode', ['mvar', 'var'])
  def test_greedy_samples_are_the_argmax_of_teacher_forced_logits(self, pipe, mode):
    """KV-cache-free sampling computes what teacher forcing computes on the sampled ids."""
    import dataclasses
    cfg = dataclasses.replace(pipe.transformer_config, attention=dataclasses.replace(
        pipe.transformer_config.attention, mode=mode))
    p = api.MVARPipeline(pipe.tokenizer_config, pipe.tokenizer_params, cfg,
                         pipe.transformer_params)
    out = p.sample(jax.random.key(0), labels=[1, 4], cfg=1.0, top_k=1)
    logits = np.asarray(p.logits(out.ids, [1, 4]))
    np.testing.assert_array_equal(logits.argmax(-1), np.concatenate(out.ids, axis=1))

  def test_a_chunk_sampler_runs_each_chunk_as_sample_does_on_its_device(self, pipe):
    """One program over 2 devices, chunk d on device d: the bytes `sample` gives each chunk."""
    devices = jax.local_devices()[:2]
    sampler = sampling.compile_chunk_sampler(
        pipe.transformer, pipe.transformer_params, pipe.tokenizer, pipe.tokenizer_params,
        devices=devices, chunk_size=3, cfg=2.0, top_k=8)
    labels = np.array([[0, 3, 4], [1, 1, 2]], np.int32)
    keys = jnp.stack([jax.random.key(7), jax.random.key(9)])
    ids, images = sampler(sampler.replicate({'params': pipe.transformer_params}),
                          sampler.replicate(pipe.tokenizer_params), keys=keys, labels=labels,
                          cfg=2.0, top_p=0.9)
    assert images.shape == (2, 3, pipe.image_size, pipe.image_size, 3)
    assert [s.device for s in images.addressable_shards] == devices
    for d, k in enumerate((7, 9)):
      want = pipe.sample(jax.random.key(k), labels=labels[d], cfg=2.0, top_k=8, top_p=0.9)
      np.testing.assert_array_equal(images[d], want.images_BHW3)
      for x, y in zip(ids, want.ids):
        np.testing.assert_array_equal(x[d], y)
    with pytest.raises(ValueError, match=r'labels must have shape \(2, 3\)'):
      sampler(pipe.transformer_params, pipe.tokenizer_params, keys=keys, labels=labels[:1])
    with pytest.raises(ValueError, match='cfg=1.0: this sampler was compiled with guidance'):
      sampler(pipe.transformer_params, pipe.tokenizer_params, keys=keys, labels=labels, cfg=1.0)

  @pytest.mark.parametrize('kwargs,field', [
      (dict(labels=[0, 6]), 'labels'), (dict(labels=[-1]), 'labels'), (dict(cfg=-1.0), 'cfg'),
      (dict(top_p=-0.1), 'top_p'), (dict(top_p=1.5), 'top_p'), (dict(top_k=-2), 'top_k'),
      (dict(labels=None, batch_size=0), 'batch_size')])
  def test_bad_arguments_name_the_field(self, pipe, kwargs, field):
    kwargs = {'labels': [0], **kwargs}
    with pytest.raises(ValueError, match=field):
      pipe.sample(jax.random.key(0), **kwargs)
