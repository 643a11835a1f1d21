"""Evaluators: scheduling, the validation-loss summary, and FID of real samples from the sampler."""

import jax
import numpy as np
import pytest

from configs import common
from mvar_jax import convert, transformer, vqvae
from mvar_jax.attention import AttentionConfig
from mvar_jax.evaluation import evaluators, features, inception, reference


class Constant:
  def __init__(self, **values):
    self.values, self.calls = values, 0

  def run(self, params):
    self.calls += 1
    yield from self.values.items()


class Writer:
  def __init__(self):
    self.written = []

  def write_scalars(self, step, scalars):
    self.written.append((step, dict(scalars)))


def test_run_all_runs_what_is_due_and_everything_at_the_end():
  often, never = Constant(a=1.0), Constant(b=2.0)
  evals = [evaluators.Scheduled('often', often, every=10, prefix='x/'),
           evaluators.Scheduled('final_only', never, every=0)]
  writer = Writer()
  assert evaluators.run_all(evals, None, 7, writer) == {}
  assert not evaluators.any_due(evals, 7)
  assert evaluators.run_all(evals, None, 20, writer) == {'x/a': 1.0}
  assert evaluators.run_all(evals, None, 23, writer, final=True) == {'x/a': 1.0, 'b': 2.0}
  assert (often.calls, never.calls) == (2, 1)
  assert writer.written == [(20, {'x/a': 1.0}), (23, {'x/a': 1.0, 'b': 2.0})]


def test_validation_loss_sums_per_scale_like_the_trainer():
  patch_nums = (1, 2, 3)
  batches = [{'nll_K': np.array([1.0, 8.0, 18.0]), 'correct_K': np.array([1.0, 2.0, 3.0]),
              'count_K': np.array([1.0, 4.0, 9.0])},
             {'nll_K': np.array([3.0, 0.0, 9.0]), 'correct_K': np.array([0.0, 4.0, 6.0]),
              'count_K': np.array([1.0, 4.0, 9.0])}]
  ev = evaluators.ValidationLoss(lambda params, b: b, lambda: iter(batches), patch_nums)
  out = dict(ev.run(params=None))
  assert out['val_loss/s00_1x1'] == pytest.approx(2.0)
  assert out['val_loss/s01_2x2'] == pytest.approx(1.0)
  assert out['val_loss/s02_3x3'] == pytest.approx(1.5)
  assert out['val_acc/s02_3x3'] == pytest.approx(50.0)
  assert out['val/loss'] == pytest.approx(39.0 / 28.0)
  assert dict(evaluators.ValidationLoss(lambda p, b: b, lambda: iter([]), patch_nums).run(None)) == {}


def test_balanced_labels_cycle_through_the_classes():
  np.testing.assert_array_equal(evaluators.balanced_labels(7, 3), [0, 1, 2, 0, 1, 2, 0])


@pytest.fixture(scope='module')
def tiny_mvar():
  pn = (1, 2, 3, 4)
  v_cfg = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                            patch_nums=pn, using_sa=False, using_mid_sa=False)
  t_cfg = transformer.TransformerConfig(
      depth=1, width=32, num_heads=2, vocab_size=32, cvae=8, num_classes=3, patch_nums=pn,
      attention=AttentionConfig(refine_step=3, kernel_size=3)).validate()
  v_params = vqvae.init_params(v_cfg, jax.random.key(0, impl='unsafe_rbg'))['params']
  t_params = transformer.init_params(t_cfg, jax.random.key(1, impl='unsafe_rbg'))['params']
  return (transformer.MVARTransformer(t_cfg), t_params, vqvae.Tokenizer(v_cfg), v_params)


def test_sample_fid_scores_real_samples_with_balanced_labels(tiny_mvar):
  model, t_params, tok, v_params = tiny_mvar
  sample = evaluators.mvar_sample_fn(model, tok, v_params, cfg=1.5, top_k=0, top_p=1.0)
  seen = []

  def recording_sample_fn(params, labels, key):
    seen.append(np.asarray(labels))
    out = sample(params, labels, key)
    assert out.dtype == np.uint8 and out.shape == (len(labels), 8, 8, 3)
    return out

  rng = np.random.default_rng(0)
  ref = reference.from_features({'pool': rng.random((12, 2048), np.float32),
                                 'spatial': rng.random((12, 2023), np.float32)}, 'adm')
  extractor = features.FeatureExtractor(inception.random_params(0), per_device_batch=1)
  ev = evaluators.SampleFID(sample_fn=recording_sample_fn, extractor=extractor, reference=ref,
                            num_images=5, num_classes=3, batch_size=4)
  out = dict(ev.run(t_params))

  assert set(out) == {'fid', 'sfid', 'inception_score', 'precision', 'recall'}
  assert all(np.isfinite(v) for v in out.values())
  assert out['fid'] > 0 and 0 <= out['precision'] <= 1 and 0 <= out['recall'] <= 1
  # Two sampling calls of one compiled size; labels 0,1,2,0 then 1 (padded with its last).
  np.testing.assert_array_equal(np.concatenate(seen), [0, 1, 2, 0, 1, 1, 1, 1])


def test_from_config_adds_fid_only_when_configured(tiny_mvar, tmp_path):
  model, _, tok, v_params = tiny_mvar
  config = common.get_config('runlocal')
  eval_fn, batches = (lambda p, b: b), (lambda: iter([]))
  evals = evaluators.from_config(config, model=model, tokenizer=tok, tok_params=v_params,
                                 eval_fn=eval_fn, eval_batches=batches)
  assert [e.name for e in evals] == ['val_loss']
  assert evals[0].every == config.train.eval_every

  weights = str(tmp_path / 'inception')
  convert.save_converted(weights, 'inception', inception.InceptionConfig(),
                         jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                                inception.abstract_params()))
  rng = np.random.default_rng(1)
  reference.save(reference.from_features({'pool': rng.random((8, 2048), np.float32),
                                          'spatial': rng.random((8, 2023), np.float32)}, 'adm'),
                 str(tmp_path / 'ref.npz'))
  config.eval.inception, config.eval.reference = weights, str(tmp_path / 'ref.npz')
  config.eval.fid_every, config.eval.fid_images = 50, 100
  evals = evaluators.from_config(config, model=model, tokenizer=tok, tok_params=v_params)
  (fid,) = evals
  assert (fid.name, fid.every, fid.prefix) == ('fid', 50, 'eval/')
  assert fid.evaluator.num_images == 100 and fid.evaluator.reference.num_images == 8

  for field, bad in (('fid_images', 2), ('fid_every', -1), ('preprocess', 'tf2')):
    bad_config = common.get_config('runlocal')
    bad_config.eval.inception = weights
    bad_config.eval[field] = bad
    with pytest.raises(ValueError, match=f'eval.{field}'):
      evaluators.from_config(bad_config, model=model, tokenizer=tok, tok_params=v_params)
