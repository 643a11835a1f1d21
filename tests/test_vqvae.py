"""The tokenizer: official parameter names and count, torch-equivalent numerics, invariants.

The torch reference below is written from the architecture description (functional
ops only) and reads a state dict with the official key names, so it checks both the
numerics and the naming rule that `mvar_jax.convert` relies on.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from mvar_jax import convert, vqvae
from mvar_jax.layout import phi_index

torch.set_num_threads(2)

# 32 px images, downsample 4 -> 8x8 latent. 8 -> 6 and 8 -> 3 have overlapping area
# windows; 6 scales over 4 Phis reach every Phi without a tick tie.
SMALL = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2, 2), z_channels=8, vocab_size=64,
                          patch_nums=(1, 2, 3, 4, 6, 8), eini=0.0)


# ----------------------------------------------------------------------------- official keys

def official_shapes(cfg: vqvae.VQVAEConfig) -> dict[str, tuple[int, ...]]:
  """Torch state-dict keys and shapes of VAR's VQVAE built with `cfg` (incl. the buffer)."""
  out = {}

  def conv(p, cin, cout, k):
    out[f'{p}.weight'], out[f'{p}.bias'] = (cout, cin, k, k), (cout,)

  def norm(p, c):
    out[f'{p}.weight'], out[f'{p}.bias'] = (c,), (c,)

  def res(p, cin, cout):
    norm(f'{p}.norm1', cin), conv(f'{p}.conv1', cin, cout, 3)
    norm(f'{p}.norm2', cout), conv(f'{p}.conv2', cout, cout, 3)
    if cin != cout:
      conv(f'{p}.nin_shortcut', cin, cout, 1)

  def attn(p, c):
    norm(f'{p}.norm', c), conv(f'{p}.qkv', c, 3 * c, 1), conv(f'{p}.proj_out', c, c, 1)

  def mid(p, c):
    res(f'{p}.block_1', c, c)
    if cfg.using_mid_sa:
      attn(f'{p}.attn_1', c)
    res(f'{p}.block_2', c, c)

  n, ch, z = len(cfg.ch_mult), cfg.ch, cfg.z_channels
  conv('encoder.conv_in', cfg.in_channels, ch, 3)
  c = ch
  for i, m in enumerate(cfg.ch_mult):
    for j in range(cfg.num_res_blocks):
      res(f'encoder.down.{i}.block.{j}', c, ch * m)
      c = ch * m
      if i == n - 1 and cfg.using_sa:
        attn(f'encoder.down.{i}.attn.{j}', c)
    if i != n - 1:
      conv(f'encoder.down.{i}.downsample.conv', c, c, 3)
  mid('encoder.mid', c)
  norm('encoder.norm_out', c), conv('encoder.conv_out', c, z, 3)
  c = ch * cfg.ch_mult[-1]
  conv('decoder.conv_in', z, c, 3)
  mid('decoder.mid', c)
  for i in reversed(range(n)):
    for j in range(cfg.num_res_blocks + 1):
      res(f'decoder.up.{i}.block.{j}', c, ch * cfg.ch_mult[i])
      c = ch * cfg.ch_mult[i]
      if i == n - 1 and cfg.using_sa:
        attn(f'decoder.up.{i}.attn.{j}', c)
    if i != 0:
      conv(f'decoder.up.{i}.upsample.conv', c, c, 3)
  norm('decoder.norm_out', c), conv('decoder.conv_out', c, cfg.in_channels, 3)
  conv('quant_conv', z, z, 3), conv('post_quant_conv', z, z, 3)
  out['quantize.embedding.weight'] = (cfg.vocab_size, z)
  for i in range(cfg.num_phi):
    conv(f'quantize.quant_resi.qresi_ls.{i}', z, z, 3)
  out['quantize.ema_vocab_hit_SV'] = (len(cfg.patch_nums), cfg.vocab_size)
  return out


def flax_path(key: str, shape) -> tuple[str, ...]:
  """The naming rule: numeric segments join the previous name; `weight` by layer kind."""
  path = []
  for seg in key.split('.'):
    if seg.isdigit():
      path[-1] = f'{path[-1]}_{seg}'
    else:
      path.append(seg)
  if path[-1] == 'weight':
    path[-1] = 'embedding' if path[-2] == 'embedding' else 'kernel' if len(shape) > 1 else 'scale'
  return tuple(path)


def to_torch_layout(x: np.ndarray) -> np.ndarray:
  return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x  # HWIO -> OIHW


def params_to_official(cfg, params) -> dict[str, torch.Tensor]:
  """Flax params -> torch state dict with the official keys (inverse of the rule)."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  return {k: torch.from_numpy(np.array(to_torch_layout(np.asarray(flat[flax_path(k, s)]))))
          for k, s in official_shapes(cfg).items() if k != 'quantize.ema_vocab_hit_SV'}


# ----------------------------------------------------------------------------- torch reference

def t_conv(sd, p, x, stride=1, pad=None):
  w = sd[f'{p}.weight']
  pad = w.shape[-1] // 2 if pad is None else pad
  return F.conv2d(x, w, sd[f'{p}.bias'], stride=stride, padding=pad)


def t_norm(sd, p, x):
  return F.group_norm(x, 32, sd[f'{p}.weight'], sd[f'{p}.bias'], eps=1e-6)


def t_res(sd, p, x):
  h = t_conv(sd, f'{p}.conv1', F.silu(t_norm(sd, f'{p}.norm1', x)))
  h = t_conv(sd, f'{p}.conv2', F.silu(t_norm(sd, f'{p}.norm2', h)))
  return (t_conv(sd, f'{p}.nin_shortcut', x) if f'{p}.nin_shortcut.weight' in sd else x) + h


def t_attn(sd, p, x):
  b, c, hh, ww = x.shape
  q, k, v = t_conv(sd, f'{p}.qkv', t_norm(sd, f'{p}.norm', x)).reshape(b, 3, c, hh * ww).unbind(1)
  w = torch.softmax(torch.einsum('bci,bcj->bij', q, k) * c ** -0.5, dim=-1)  # (B, query, key)
  return x + t_conv(sd, f'{p}.proj_out', torch.einsum('bij,bcj->bci', w, v).reshape(b, c, hh, ww))


def t_level(sd, p, x, n_blocks):
  for j in range(n_blocks):
    x = t_res(sd, f'{p}.block.{j}', x)
    if f'{p}.attn.{j}.qkv.weight' in sd:
      x = t_attn(sd, f'{p}.attn.{j}', x)
  return x


def t_mid(sd, p, x):
  x = t_res(sd, f'{p}.block_1', x)
  if f'{p}.attn_1.qkv.weight' in sd:
    x = t_attn(sd, f'{p}.attn_1', x)
  return t_res(sd, f'{p}.block_2', x)


def t_encode(sd, cfg, img):
  n = len(cfg.ch_mult)
  x = t_conv(sd, 'encoder.conv_in', img)
  for i in range(n):
    x = t_level(sd, f'encoder.down.{i}', x, cfg.num_res_blocks)
    if i != n - 1:
      x = t_conv(sd, f'encoder.down.{i}.downsample.conv', F.pad(x, (0, 1, 0, 1)), stride=2, pad=0)
  x = t_mid(sd, 'encoder.mid', x)
  x = t_conv(sd, 'encoder.conv_out', F.silu(t_norm(sd, 'encoder.norm_out', x)))
  return t_conv(sd, 'quant_conv', x)


def t_decode(sd, cfg, f_hat):
  x = t_conv(sd, 'decoder.conv_in', t_conv(sd, 'post_quant_conv', f_hat))
  x = t_mid(sd, 'decoder.mid', x)
  for i in reversed(range(len(cfg.ch_mult))):
    x = t_level(sd, f'decoder.up.{i}', x, cfg.num_res_blocks + 1)
    if i != 0:
      x = F.interpolate(x, scale_factor=2, mode='nearest')
      x = t_conv(sd, f'decoder.up.{i}.upsample.conv', x)
  return t_conv(sd, 'decoder.conv_out', F.silu(t_norm(sd, 'decoder.norm_out', x))).clamp(-1, 1)


def t_phi(sd, cfg, si, h):
  k, n_phi = len(cfg.patch_nums), cfg.num_phi
  ticks = np.linspace(1 / 3 / n_phi, 1 - 1 / 3 / n_phi, n_phi)  # n_phi == 4
  i = int(np.argmin(np.abs(ticks - si / (k - 1))))
  return 0.5 * h + 0.5 * t_conv(sd, f'quantize.quant_resi.qresi_ls.{i}', h)


def t_code_up(sd, cfg, si, ids_BL):
  pn, last = cfg.patch_nums[si], cfg.patch_nums[-1]
  h = sd['quantize.embedding.weight'][ids_BL].reshape(-1, pn, pn, cfg.z_channels)
  h = h.permute(0, 3, 1, 2)
  if si != len(cfg.patch_nums) - 1:
    h = F.interpolate(h, size=(last, last), mode='bicubic')
  return t_phi(sd, cfg, si, h)


def t_img_to_ids(sd, cfg, f):
  e = sd['quantize.embedding.weight']
  f_rest, f_hat, ids = f.clone(), torch.zeros_like(f), []
  for si, pn in enumerate(cfg.patch_nums):
    last = si == len(cfg.patch_nums) - 1
    z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode='area')
    z = z.permute(0, 2, 3, 1).reshape(-1, cfg.z_channels)
    d = z.square().sum(1, keepdim=True) + e.square().sum(1) - 2 * z @ e.T
    ids.append(d.argmin(1).reshape(f.shape[0], pn * pn))
    h = t_code_up(sd, cfg, si, ids[-1])
    f_hat, f_rest = f_hat + h, f_rest - h
  return ids, f_hat


def t_teacher_input(sd, cfg, ids):
  f_hat, parts = 0.0, []
  for si in range(len(cfg.patch_nums) - 1):
    f_hat = f_hat + t_code_up(sd, cfg, si, ids[si])
    pn = cfg.patch_nums[si + 1]
    parts.append(F.interpolate(f_hat, size=(pn, pn), mode='area').flatten(2).transpose(1, 2))
  return torch.cat(parts, 1)


# ----------------------------------------------------------------------------- fixtures

# Small enough to compile in seconds on CPU: the invariants need no depth (attention is
# covered by the torch comparison on SMALL).
TINY = vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, vocab_size=16,
                         patch_nums=(1, 2, 3, 4), using_sa=False, using_mid_sa=False, eini=0.0)


def images(cfg, b=2, seed=2):
  s = cfg.resolution
  return jax.random.uniform(jax.random.key(seed), (b, s, s, cfg.in_channels), jnp.float32, -1, 1)


def nchw(x):
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- names and count

def test_default_config_has_the_official_parameter_count():
  abstract = jax.eval_shape(lambda: vqvae.init_params(vqvae.VQVAEConfig(), jax.random.key(0)))
  assert round(vqvae.count_params(abstract) / 1e6, 2) == 108.95
  official = official_shapes(vqvae.VQVAEConfig())
  assert len(official) == 324
  assert sum(np.prod(s) for k, s in official.items() if k != 'quantize.ema_vocab_hit_SV') == \
      vqvae.count_params(abstract)


@pytest.mark.parametrize('cfg', [vqvae.VQVAEConfig(), SMALL,
                                 vqvae.VQVAEConfig(ch=32, ch_mult=(1, 2), patch_nums=(1, 2),
                                                   num_phi=4, using_sa=False, using_mid_sa=False)],
                         ids=['default', 'small', 'no_attention'])
def test_official_keys_map_one_to_one_onto_the_flax_tree(cfg):
  abstract = jax.eval_shape(lambda: vqvae.init_params(cfg, jax.random.key(0)))['params']
  flat = {p: v.shape for p, v in traverse_util.flatten_dict(nn.unbox(abstract)).items()}
  official = {k: s for k, s in official_shapes(cfg).items() if k != 'quantize.ema_vocab_hit_SV'}
  mapped = {flax_path(k, s): s for k, s in official.items()}
  assert len(mapped) == len(official)
  assert set(mapped) == set(flat)
  for path, torch_shape in mapped.items():
    expect = (torch_shape[2], torch_shape[3], torch_shape[1], torch_shape[0]) \
        if len(torch_shape) == 4 else torch_shape
    assert flat[path] == expect, path


def test_lead_converter_round_trips_the_official_names():
  params = vqvae.random_params(SMALL)
  sd = {k: v.numpy() for k, v in params_to_official(SMALL, params).items()}
  sd['quantize.ema_vocab_hit_SV'] = np.zeros((len(SMALL.patch_nums), SMALL.vocab_size), np.float32)
  _, back = convert.convert_vqvae(sd, config=SMALL)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back,
                         jax.tree_util.tree_map(np.asarray, params))
  assert convert.infer_vqvae_config(sd, patch_nums=SMALL.patch_nums, eini=0.0) == SMALL
  assert set(convert.params_to_state_dict(params)) == set(sd) - {'quantize.ema_vocab_hit_SV'}


# ----------------------------------------------------------------------------- numerics vs torch

@functools.partial(jax.jit, static_argnums=0)
def _encode_tokenize_decode(cfg, params, img):
  """One compile for the whole pipeline (the public methods, encoder traced once)."""

  def run(m: vqvae.VQVAE, img):
    f = m.encode(img)
    ids, _ = m.quantize.quantize(f)
    return f, ids, m.ids_to_teacher_input(ids), m.ids_to_img(ids)

  return vqvae.VQVAE(cfg).apply({'params': params}, img, method=run)


def test_matches_a_torch_functional_reference():
  params = vqvae.random_params(SMALL)
  sd = params_to_official(SMALL, params)
  img = images(SMALL)
  with torch.no_grad():
    f_ref = t_encode(sd, SMALL, nchw(img))
    ids_ref, fhat_ref = t_img_to_ids(sd, SMALL, f_ref)
    teacher_ref = t_teacher_input(sd, SMALL, ids_ref)
    img_ref = t_decode(sd, SMALL, fhat_ref)

  f, ids, teacher, rec = _encode_tokenize_decode(SMALL, params, img)
  np.testing.assert_allclose(np.asarray(f), f_ref.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-4)
  for si, (a, b) in enumerate(zip(ids, ids_ref)):
    assert a.dtype == jnp.int32 and a.shape == (2, SMALL.patch_nums[si] ** 2)
    np.testing.assert_array_equal(np.asarray(a), b.numpy(), err_msg=f'scale {si}')
  assert len(np.unique(np.concatenate([np.asarray(x).ravel() for x in ids]))) > 10  # non-degenerate
  assert teacher.shape == (2, SMALL.layout.total_len - 1, SMALL.z_channels)
  assert teacher.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(teacher), teacher_ref.numpy(), atol=1e-4, rtol=1e-4)
  assert 0 < np.mean(np.abs(img_ref.numpy()) == 1.0) < 0.5  # the clamp is exercised, not saturated
  np.testing.assert_allclose(np.asarray(rec), img_ref.permute(0, 2, 3, 1).numpy(), atol=1e-4,
                             rtol=1e-4)


# ----------------------------------------------------------------------------- invariants

TOK = vqvae.Tokenizer(TINY)


# Compiles dominate on CPU, so the invariant tests share one set of tokenizer results.
@functools.lru_cache(maxsize=None)
def tiny_run():
  params, img = vqvae.random_params(TINY), images(TINY)
  ids, f_hat = TOK.img_to_ids(params, img, return_fhat=True)
  return dict(params=params, img=img, ids=ids, f_hat=f_hat, f=TOK.encode(params, img),
              fhat_from_ids=TOK.ids_to_fhat(params, ids),
              teacher=TOK.ids_to_teacher_input(params, ids))


@functools.lru_cache(maxsize=None)
def tiny_replay():
  """The sampler's loop over scales: (f_hat, next_map) after each scale."""
  r = tiny_run()
  codebook_VC = TOK.codebook(r['params'])
  f_hat, out = None, []
  for si, pn in enumerate(TINY.patch_nums):
    h_BhwC = codebook_VC[r['ids'][si]].reshape(2, pn, pn, -1)
    f_hat, next_map = TOK.next_autoregressive_input(r['params'], si, f_hat, h_BhwC)
    out.append((f_hat, next_map))
  return out


def test_fhat_from_ids_equals_the_encoder_side_accumulation():
  r = tiny_run()
  np.testing.assert_allclose(np.asarray(r['fhat_from_ids']), np.asarray(r['f_hat']),
                             atol=1e-5, rtol=1e-5)


def test_next_autoregressive_input_replays_decoding_and_teacher_input():
  r, layout = tiny_run(), TINY.layout
  teacher = np.asarray(r['teacher'])
  for si, (f_hat, next_map) in enumerate(tiny_replay()):
    if si + 1 < layout.num_scales:
      begin, end = layout.begin(si + 1) - 1, layout.end(si + 1) - 1  # teacher input skips scale 0
      np.testing.assert_allclose(np.asarray(next_map).reshape(2, -1, TINY.z_channels),
                                 teacher[:, begin:end], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(next_map), np.asarray(f_hat))
  np.testing.assert_allclose(np.asarray(f_hat), np.asarray(r['fhat_from_ids']), atol=1e-5,
                             rtol=1e-5)
  # The (B, pn*pn, C) layout of a scale's codes is accepted as well.
  h_BlC = TOK.embed_ids(r['params'], r['ids'][0])
  codebook_VC = TOK.codebook(r['params'])
  np.testing.assert_array_equal(np.asarray(h_BlC), np.asarray(codebook_VC[r['ids'][0]]))
  f0, _ = TOK.next_autoregressive_input(r['params'], 0, None, h_BlC)
  np.testing.assert_allclose(np.asarray(f0), np.asarray(tiny_replay()[0][0]), atol=1e-6)


def test_training_forward_losses_straight_through_and_usage():
  r = tiny_run()
  params, img, ids = r['params'], r['img'], r['ids']
  rec, vq_loss, hits_SV = TOK(params, img)
  # The straight-through f_hat has the value of f_hat; the reconstruction is not clamped.
  np.testing.assert_allclose(np.clip(np.asarray(rec), -1, 1),
                             np.asarray(TOK.fhat_to_img(params, r['f_hat'])), atol=1e-5)
  # Both loss terms have the value mse(f_hat_k, f): vq_loss = (1 + beta) * mean_k mse_k,
  # with f_hat_k the running sum after scale k.
  mses = [float(jnp.mean(jnp.square(f_hat_k - r['f']))) for f_hat_k, _ in tiny_replay()]
  np.testing.assert_allclose(float(vq_loss), (1 + TINY.beta) * np.mean(mses), rtol=1e-5)
  assert hits_SV.shape == (len(ids), TINY.vocab_size) and hits_SV.dtype == jnp.int32
  for si, ids_BL in enumerate(ids):
    np.testing.assert_array_equal(np.asarray(hits_SV[si]),
                                  np.bincount(np.asarray(ids_BL).ravel(),
                                              minlength=TINY.vocab_size))

  # One backward pass, vmapped over the two outputs: d vq_loss and d sum(reconstruction).
  def outputs(p):
    rec, vq_loss, _ = TOK(p, img)
    return jnp.stack([vq_loss, jnp.sum(rec)])

  g = jax.jit(jax.jacrev(outputs))(params)
  norm = lambda *path: np.abs(np.asarray(functools.reduce(lambda t, k: t[k], path, g))).reshape(
      2, -1).sum(1)
  loss_enc, rec_enc = norm('encoder', 'conv_in', 'kernel')
  loss_code, rec_code = norm('quantize', 'embedding', 'embedding')
  loss_phi, _ = norm('quantize', 'quant_resi', 'qresi_ls_3', 'kernel')
  loss_dec, _ = norm('decoder', 'conv_in', 'kernel')
  assert loss_enc > 0 and loss_code > 0 and loss_phi > 0  # commitment and codebook terms
  assert loss_dec == 0
  assert rec_enc > 0  # straight-through estimator
  assert rec_code == 0  # the reconstruction sees the codes only through the stopped f_hat


def test_methods_are_usable_with_apply_and_boxed_params():
  # init_params returns boxed (logically partitioned) params; shapes suffice to build a
  # boxed tree, and a compiled threefry init costs ~10 s of CPU compile time.
  abstract = jax.eval_shape(lambda: vqvae.init_params(TINY, jax.random.key(0)))
  assert abstract['params']['encoder']['conv_in']['kernel'].names == \
      (None, None, 'vae_in', 'vae_out')
  r = tiny_run()
  is_box = lambda x: isinstance(x, nn.Partitioned)
  boxed = {'params': jax.tree_util.tree_map(lambda box, v: box.replace_boxed(v), abstract['params'],
                                            r['params'], is_leaf=is_box)}
  apply = jax.jit(functools.partial(vqvae.VQVAE(TINY).apply, method=vqvae.VQVAE.ids_to_fhat))
  np.testing.assert_array_equal(np.asarray(apply(boxed, r['ids'])), np.asarray(r['fhat_from_ids']))
  assert TOK.codebook(boxed).shape == (TINY.vocab_size, TINY.z_channels)


def test_phi_index_table_for_ten_scales():
  assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize('overrides,field', [
    (dict(ch=40), 'norm_groups'),
    (dict(ch_mult=()), 'ch_mult'),
    (dict(vocab_size=0), 'vocab_size'),
    (dict(patch_nums=(1, 3, 2)), 'patch_nums'),
    (dict(image_size=128), 'image_size'),
    (dict(phi_ratio=0.0), 'phi_ratio'),
    (dict(precision='fp8'), 'precision'),
    (dict(decoder_dtype='int8'), 'decoder_dtype'),
])
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    vqvae.VQVAEConfig(**overrides)


def test_a_bf16_decoder_rounds_but_keeps_the_params_and_returns_fp32():
  r = tiny_run()
  bf16 = dataclasses.replace(TINY, decoder_dtype='bfloat16')
  abstract = lambda cfg: nn.unbox(jax.eval_shape(lambda: vqvae.init_params(cfg, jax.random.key(0))))
  # Same (fp32) params, names and shapes: any checkpoint decodes either way.
  assert abstract(bf16) == abstract(TINY)
  assert {x.dtype for x in jax.tree_util.tree_leaves(abstract(bf16))} == {jnp.dtype('float32')}
  ref = np.asarray(TOK.fhat_to_img(r['params'], r['f_hat']))
  out = vqvae.Tokenizer(bf16).fhat_to_img(r['params'], r['f_hat'])
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  err = np.abs(np.asarray(out) - ref)
  assert 0 < err.max() < 0.05 and err.mean() < 0.01  # bf16 rounding, not another function


def test_a_bf16_decode_with_params_cast_once_is_the_same_decode():
  """cast_for_decode (the sampler casts once, not per chunk): kernels and biases in bf16, the
  GroupNorm params fp32, the rest untouched; the images are the per-call cast's, up to the
  upsampling taps (now summed from bf16 kernels)."""
  r = tiny_run()
  bf16 = vqvae.Tokenizer(dataclasses.replace(TINY, decoder_dtype='bfloat16'))
  cast = bf16.cast_for_decode(r['params'])
  dtypes = lambda tree: {jax.tree_util.keystr(k): x.dtype
                         for k, x in jax.tree_util.tree_leaves_with_path(tree)}
  for path, dt in dtypes({'decoder': cast['decoder'], 'pqc': cast['post_quant_conv']}).items():
    want = jnp.float32 if path.endswith("['scale']") or "norm" in path else jnp.bfloat16
    assert dt == want, path
  for name in ('encoder', 'quant_conv', 'quantize'):
    assert cast[name] is r['params'][name]
  assert TOK.cast_for_decode(r['params']) is r['params']  # fp32 decoders: unchanged
  wrapped = bf16.cast_for_decode({'params': r['params']})
  assert wrapped['params']['decoder']['conv_in']['kernel'].dtype == jnp.bfloat16
  ref = np.asarray(bf16.fhat_to_img(r['params'], r['f_hat']))
  out = np.asarray(bf16.fhat_to_img(cast, r['f_hat']))
  assert np.abs(out - ref).max() < 0.05


class TestGroupNorm:
  """Ours (per-channel sums) against flax's nn.GroupNorm, whose params it shares."""

  def _both(self, x, **kw):
    ours, theirs = vqvae.GroupNorm(8, 1e-6, **kw), nn.GroupNorm(num_groups=8, epsilon=1e-6,
                                                                 use_fast_variance=False)
    params = theirs.init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(jnp.shape, nn.unbox(ours.init(jax.random.key(0), x))) == \
        jax.tree_util.tree_map(jnp.shape, params)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.normal(size=p.shape), params)
    return ours.apply(params, x), theirs.apply(params, x)

  def test_two_pass_matches_flax(self):
    x = jax.random.normal(jax.random.key(1), (2, 6, 5, 32)) * 3 + 2
    ours, theirs = self._both(x)
    np.testing.assert_allclose(ours, theirs, atol=2e-6, rtol=1e-5)

  def test_single_pass_is_close_for_moderate_means_and_casts_the_output(self):
    x = jax.random.normal(jax.random.key(2), (2, 6, 5, 32)) + 0.5
    ours, theirs = self._both(x, single_pass=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    out, _ = self._both(x.astype(jnp.bfloat16), dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16

  @pytest.mark.parametrize('height,width', [(8, 8), (6, 5)])  # 16 divides 64 pixels, not 30
  def test_single_pass_sums_over_wide_rows_are_the_pixel_sums(self, height, width):
    x = jax.random.normal(jax.random.key(3), (2, height, width, 32)) + 0.5
    total, squares = vqvae._pixel_sums(x, vqvae.GroupNorm.SUM_ROWS)
    np.testing.assert_allclose(total, x.sum(axis=(1, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(squares, jnp.square(x).sum(axis=(1, 2)), rtol=1e-5, atol=1e-4)
    ours, theirs = self._both(x, single_pass=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

  def test_channels_must_divide_into_groups(self):
    with pytest.raises(ValueError, match='12 channels are not divisible by 8 groups'):
      vqvae.GroupNorm(8).init(jax.random.key(0), jnp.zeros((1, 2, 2, 12)))


def test_bad_inputs_raise():
  params = tiny_run()['params']
  with pytest.raises(ValueError, match='images must be'):
    TOK.img_to_ids(params, jnp.zeros((1, 16, 16, 3)))
  ids = [jnp.zeros((1, p * p), jnp.int32) for p in TINY.patch_nums]
  with pytest.raises(ValueError, match='4 scales'):
    TOK.ids_to_fhat(params, ids[:-1])
  with pytest.raises(ValueError, match='ids of scale 1'):
    TOK.ids_to_fhat(params, [ids[0], ids[2]] + ids[2:])


def test_config_survives_a_json_round_trip():
  d = convert.config_to_dict(SMALL)
  d.pop('_type')
  d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
  assert vqvae.VQVAEConfig(**d) == SMALL and hash(vqvae.VQVAEConfig(**d)) == hash(SMALL)


class TestDecoderStages:
  """The decoder as a sequence of stages (the sampler decodes small maps whole, large ones
  in chunks)."""

  def test_any_two_part_split_is_the_whole_decode(self):
    r = tiny_run()
    whole = np.asarray(TOK.decode(r['params'], r['f_hat']))
    n, sides = vqvae.num_decoder_stages(TINY), vqvae.decoder_stage_sides(TINY)
    assert len(sides) == n and sides[-1] == TINY.resolution
    for k in range(1, n):
      h = TOK.decode_stages(r['params'], r['f_hat'], 0, k)
      assert h.shape[1:3] == (sides[k - 1],) * 2
      np.testing.assert_allclose(TOK.decode_stages(r['params'], h, k), whole, rtol=1e-6,
                                 atol=1e-6)

  def test_stage_sides_of_the_256px_tokenizer(self):
    # conv_in + mid at 16 px, up_4..up_1 each doubling, up_0 and conv_out at 256 px.
    assert vqvae.decoder_stage_sides(vqvae.VQVAEConfig()) == (16, 32, 64, 128, 256, 256, 256)

  @pytest.mark.parametrize('begin,end', [(0, 0), (2, 1), (0, 5), (-1, 2)])
  def test_a_bad_stage_range_is_named(self, begin, end):
    r = tiny_run()
    with pytest.raises(ValueError, match='decoder stages must satisfy'):
      TOK.decode_stages(r['params'], r['f_hat'], begin, end)


def test_tap_sum_conv_is_a_3x3_same_conv_with_nn_conv_params():
  """conv_out of 16-bit decoders: one matmul to the nine taps' maps, then shifted sums."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 8))
  module = vqvae.TapSumConv(3, jax.lax.Precision.HIGHEST)
  params = nn.unbox(module.init(jax.random.key(1), x))
  assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
      jnp.shape, nn.Conv(3, (3, 3)).init(jax.random.key(1), x))
  rng = np.random.default_rng(0)  # a nonzero bias, so the test sees it added once
  params = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.normal(size=p.shape), params)
  kernel, bias = params['params']['kernel'], params['params']['bias']
  direct = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision=jax.lax.Precision.HIGHEST) + bias
  out = module.apply(params, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-5)
  # bf16 operands, fp32 sums: bf16 rounding of the inputs only.
  out16 = vqvae.TapSumConv(3, jax.lax.Precision.DEFAULT, jnp.bfloat16).apply(params, x)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, direct, rtol=0, atol=0.05)
  assert 0 < float(jnp.abs(out16 - direct).max())


def test_a_16_bit_decoder_ends_in_the_tap_sum_conv_an_fp32_one_in_a_conv():
  f = jnp.zeros((1, 4, 4, TINY.z_channels))
  convs = lambda cfg: str(jax.make_jaxpr(
      lambda p, x: vqvae.Tokenizer(cfg).decode(p, x))(tiny_run()['params'], f)).count(
          'conv_general_dilated')
  bf16 = dataclasses.replace(TINY, decoder_dtype='bfloat16')
  assert convs(bf16) == convs(TINY) - 1


def test_upsample_conv_is_nearest_x2_then_a_3x3_same_conv():
  """The four output phases' 2x2 kernels (sums of the 3x3 taps) give the direct form."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  module = vqvae.UpsampleConv(4, jax.lax.Precision.HIGHEST)
  params = nn.unbox(module.init(jax.random.key(1), x))
  kernel, bias = params['params']['kernel'], params['params']['bias']
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  direct = jax.lax.conv_general_dilated(up, kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision=jax.lax.Precision.HIGHEST) + bias
  np.testing.assert_allclose(module.apply(params, x), direct, rtol=1e-5, atol=1e-5)
  # The phase kernels are elementwise sums: no contraction (a degenerate GEMM on GPU).
  assert 'dot_general' not in str(jax.make_jaxpr(vqvae.phase_kernels)(kernel))
