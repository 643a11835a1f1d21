"""The optimiser: upstream's schedules, the decay mask, clipping, and per-segment AdamW."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from mvar_jax import config_utils, optim
from mvar_jax import transformer as tfm

PATCH_NUMS = (1, 2, 3, 4)
VOCAB = 16


# ============================================================================= lr and weight decay

def _upstream_lin0(it, wp, total, wp0, wpe):
  """The lin0 shape as upstream's lr_wd_annealing describes it (factor of the peak lr)."""
  if it < wp:
    return wp0 + (1 - wp0) * it / wp
  progress = (it - wp) / (total - 1 - wp)
  return 1.0 if progress < 0.05 else wpe + (1 - wpe) * (1 - progress) / 0.95


def test_lin0_schedule_shape():
  kw = dict(kind='lin0', warmup_steps=100, total_steps=1000, warmup_start=0.005, lr_end=0.1)
  f = lambda s: float(optim.lr_factor(s, **kw))
  assert f(0) == pytest.approx(0.005)  # warm-up starts at wp0
  assert f(50) == pytest.approx(0.005 + 0.995 * 0.5)
  assert f(100) == pytest.approx(1.0)  # peak after warm-up
  assert f(100 + 44) == pytest.approx(1.0)  # held for 5% of the rest
  assert f(999) == pytest.approx(0.1)  # ends at wpe
  for s in range(0, 1000, 7):
    assert f(s) == pytest.approx(_upstream_lin0(s, 100, 1000, 0.005, 0.1), rel=1e-5)
  steps = np.arange(100, 1000)
  values = np.asarray(optim.lr_factor(steps, **kw))
  assert np.all(np.diff(values) <= 1e-7)  # never increases after the peak


def test_peak_lr_scales_with_the_global_batch():
  c = common.get_config()
  c.train.batch_size, c.train.tblr = 448, 1e-4
  assert config_utils.peak_lr(c) == pytest.approx(1e-4 * 448 / 256)
  sched = optim.Schedule.from_config(c, data_steps_per_epoch=2860)
  assert sched.total_steps == 300 * 2860
  assert sched.warmup_steps == round(300 / 50 * 2860)  # warm-up ep/50 epochs


def test_weight_decay_schedule_constant_or_cosine():
  const = optim.weight_decay_value(500, weight_decay=0.05, weight_decay_end=-1, total_steps=1000)
  assert float(const) == pytest.approx(0.05)
  kw = dict(weight_decay=0.05, weight_decay_end=0.08, total_steps=1001)
  assert float(optim.weight_decay_value(0, **kw)) == pytest.approx(0.05)
  assert float(optim.weight_decay_value(500, **kw)) == pytest.approx(0.065)
  assert float(optim.weight_decay_value(1000, **kw)) == pytest.approx(0.08)


def test_weight_decay_mask_follows_upstream():
  cfg = tfm.TransformerConfig(depth=1, width=32, num_heads=2, vocab_size=VOCAB, cvae=4,
                              num_classes=10, patch_nums=PATCH_NUMS)
  params = jax.eval_shape(lambda: nn.unbox(tfm.init_params(cfg, jax.random.key(0))['params']))
  mask = optim.weight_decay_mask(params)
  decayed = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(mask) if v}
  kept = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(mask) if not v}
  assert "['blocks_0']['attn']['mat_qkv']['kernel']" in decayed
  assert "['blocks_0']['ffn']['fc1']['kernel']" in decayed
  assert "['class_emb']['embedding']" in decayed  # a 2-D embedding without a no-decay key
  assert "['head']['kernel']" in decayed and "['word_embed']['kernel']" in decayed
  for name in ("['pos_1LC']", "['pos_start']", "['lvl_embed']['embedding']",
               "['blocks_0']['attn']['scale_mul_1H11']", "['blocks_0']['attn']['q_bias']",
               "['blocks_0']['attn']['v_bias']", "['blocks_0']['ffn']['fc1']['bias']",
               "['head']['bias']"):
    assert name in kept, name
  # Every kept leaf is 1-D, a bias, or named by a no-decay key.
  for name in kept:
    assert 'bias' in name or any(k in name for k in optim.NO_WEIGHT_DECAY_KEYS)


def test_optimizer_clips_the_global_norm_before_adamw():
  c = common.get_config()
  c.train.grad_clip, c.train.weight_decay = 2.0, 0.0
  tx = optim.make_optimizer(c, optim.Schedule(10, 0, 10, 1.0))
  params = {'w': jnp.ones((2, 2))}
  grads = {'w': jnp.full((2, 2), 100.0)}  # global norm 200 -> clipped to 2: entries 1.0
  updates, state = tx.update(grads, tx.init(params), params)
  mu = optax.tree_utils.tree_get(state, 'mu')
  np.testing.assert_allclose(mu['w'], (1 - 0.9) * np.ones((2, 2)), rtol=1e-6)  # b1 = 0.9
  # Adam's first step is lr * g / |g| whatever the gradient size; lr(0) = peak without warm-up.
  np.testing.assert_allclose(updates['w'], -np.ones((2, 2)), rtol=1e-4)




# ============================================================================= per-segment AdamW

def _torch_adamw_step(p, g, m, v, t, *, lr, wd, b1, b2, eps):
  """torch.optim.AdamW's update of one parameter at its own step t (1-based), in float64."""
  p = p * (1 - lr * wd)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
  return p - lr / (1 - b1 ** t) * m / denom, m, v


def test_a_parameter_a_segment_does_not_use_is_left_alone_as_torch_adamw_does():
  """Step 1 trains both leaves; step 2 (another segment) does not read 'pos'.

  By hand, as torch's AdamW (which skips a parameter whose grad is None): 'w' takes its
  second step (bias corrections at t=2); 'pos' keeps its value, its moments and its step
  count 1, so its next update would use t=2, not t=3.
  """
  lr, wd, b1, b2, eps = 0.1, 0.5, 0.9, 0.95, 1e-8
  tx = optim.adamw(lambda s: jnp.float32(lr), lambda s: jnp.float32(wd), b1=b1, b2=b2, eps=eps,
                   grad_clip=0.0, decay_mask={'w': True, 'pos': False})
  p0 = {'w': np.array([[0.5, -1.0], [2.0, 0.25]], np.float32),
        'pos': np.array([0.3, -0.7], np.float32)}
  g1 = {'w': np.array([[0.1, -0.2], [0.3, 0.05]], np.float32),
        'pos': np.array([1.0, -2.0], np.float32)}
  g2 = {'w': np.array([[-0.4, 0.1], [0.2, -0.3]], np.float32),
        'pos': np.zeros(2, np.float32)}  # what autodiff gives for an unread leaf
  active_2 = {'w': True, 'pos': False}

  state = tx.init(p0)
  u, state = tx.update(g1, state, p0)
  p1 = optim.apply_updates(p0, u)
  u, state = jax.jit(lambda g, s, p: tx.update(g, s, p, active=active_2))(g2, state, p1)
  p2 = optim.apply_updates(p1, u, active_2)

  f64 = lambda x: np.asarray(x, np.float64)
  zeros = np.zeros((2, 2))
  w1, mw, vw = _torch_adamw_step(f64(p0['w']), f64(g1['w']), zeros, zeros, 1, lr=lr, wd=wd,
                                 b1=b1, b2=b2, eps=eps)
  w2, mw, vw = _torch_adamw_step(w1, f64(g2['w']), mw, vw, 2, lr=lr, wd=wd, b1=b1, b2=b2,
                                 eps=eps)
  pos1, mpos, vpos = _torch_adamw_step(f64(p0['pos']), f64(g1['pos']), np.zeros(2), np.zeros(2),
                                       1, lr=lr, wd=0.0, b1=b1, b2=b2, eps=eps)
  np.testing.assert_allclose(p2['w'], w2, rtol=1e-6)
  np.testing.assert_allclose(state.mu['w'], mw, rtol=1e-6)
  np.testing.assert_allclose(state.nu['w'], vw, rtol=1e-6)
  np.testing.assert_allclose(p1['pos'], pos1, rtol=1e-6)
  # Untouched in step 2: the value bit for bit, the moments of step 1, one step counted.
  np.testing.assert_array_equal(p2['pos'], p1['pos'])
  np.testing.assert_allclose(state.mu['pos'], mpos, rtol=1e-6)
  np.testing.assert_allclose(state.nu['pos'], vpos, rtol=1e-6)
  assert int(state.count['pos']) == 1 and int(state.count['w']) == 2
  assert int(state.step) == 2  # the lr/wd schedules follow the global step
  # optax's adamw, with its single count, moves the unread leaf on momentum (the bug).
  ref = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=0.0)
  rs = ref.init(p0['pos'])
  ru, rs = ref.update(g1['pos'], rs, p0['pos'])
  ru, rs = ref.update(g2['pos'], rs, p0['pos'] + ru)
  assert np.abs(np.asarray(ru)).max() > 1e-3


def test_used_params_finds_what_a_function_reads():
  params = {'a': jnp.ones(3), 'b': jnp.ones(3), 'c': jnp.ones(())}
  used = optim.used_params(lambda p, x: jnp.sum(p['a'] * x) + p['c'], params, jnp.ones(3))
  assert used == {'a': True, 'b': False, 'c': True}
