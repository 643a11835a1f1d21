"""Training VAR's multi-scale VQ-VAE (the official repositories ship only weights).

    python main.py --config=configs/tokenizer.py --workdir=DIR   # or as the demo's first stage

Loss = l1 * |x - x_rec| + l2 * (x - x_rec)^2 + vq (commitment and codebook terms
averaged over scales, VAR's semantics; straight-through estimator). Codes that no
batch used for `restart_dead_every` steps are restarted on random encoder outputs
(a standard remedy for codebook collapse in small codebooks; VAR relies on size).
Logged: reconstruction and VQ losses, PSNR, codebook usage (share of codes hit in the
last logging window, per scale and overall).

The result is written like a converted checkpoint (`DIR/tokenizer/vqvae.{msgpack,json}`),
so the MVAR trainer, the sampler and `mvar_jax.api.load_pretrained` read it the same way.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from mvar_jax import convert, vqvae
from mvar_jax.data import pipeline


def vqvae_config_from(config: ml_collections.ConfigDict) -> vqvae.VQVAEConfig:
  """The tokenizer architecture of a run config (fields under `config.tokenizer`)."""
  t = config.tokenizer
  return vqvae.VQVAEConfig(
      ch=t.ch, ch_mult=tuple(t.ch_mult), num_res_blocks=t.num_res_blocks,
      z_channels=t.z_channels, vocab_size=t.vocab_size, patch_nums=tuple(t.patch_nums),
      num_phi=t.get('num_phi', 4), using_sa=t.get('using_sa', True),
      using_mid_sa=t.get('using_mid_sa', True), beta=t.get('beta', 0.25),
      precision=t.get('precision', 'highest'))


def _loss_fn(params, images, *, tok: vqvae.Tokenizer, l1: float, l2: float):
  rec, vq_loss, hits_SV = tok(params, images)
  err = rec - images
  l1_loss, l2_loss = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
  loss = l1 * l1_loss + l2 * l2_loss + vq_loss
  return loss, dict(loss=loss, l1=l1_loss, l2=l2_loss, vq=vq_loss, hits_SV=hits_SV)


@functools.partial(jax.jit, static_argnames=('tok', 'tx', 'l1', 'l2'), donate_argnums=(0, 1))
def train_step(params, opt_state, images, *, tok, tx, l1, l2):
  """One AdamW step; returns (params, opt_state, metrics)."""
  grads, metrics = jax.grad(functools.partial(_loss_fn, tok=tok, l1=l1, l2=l2), has_aux=True)(
      params, images)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics['grad_norm'] = optax.global_norm(grads)
  return params, opt_state, metrics


@functools.partial(jax.jit, static_argnames=('tok',))
def _encoder_features(params, images, *, tok):
  return tok.encode(params, images).reshape(-1, tok.config.z_channels)


def restart_dead_codes(params, dead_V: np.ndarray, features_NC: np.ndarray, rng) -> dict:
  """Moves unused codebook rows onto random encoder outputs (plus a little noise)."""
  num_dead = int(dead_V.sum())
  if num_dead == 0:
    return params
  pick = rng.choice(features_NC.shape[0], size=num_dead, replace=features_NC.shape[0] < num_dead)
  new = features_NC[pick] + 1e-3 * rng.standard_normal((num_dead, features_NC.shape[1]))
  table = np.array(params['quantize']['embedding']['embedding'])
  table[np.flatnonzero(dead_V)] = new
  params = jax.tree_util.tree_map(lambda x: x, params)  # shallow copy of the dict tree
  params['quantize']['embedding']['embedding'] = jnp.asarray(table, jnp.float32)
  return params


def train_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or reloads, when `workdir/tokenizer` holds a result) the tokenizer.

  Returns (VQVAEConfig, params).
  """
  out_dir = os.path.join(workdir, 'tokenizer')
  if os.path.exists(os.path.join(out_dir, 'vqvae.msgpack')):
    from mvar_jax import api
    logging.info('tokenizer: reusing %s', out_dir)
    return api.load_converted(out_dir, 'vqvae')
  t = config.tokenizer
  cfg = vqvae_config_from(config)
  if config.data.image_size != cfg.resolution:
    raise ValueError(f'data.image_size={config.data.image_size} must equal the tokenizer '
                     f'resolution {cfg.resolution} (patch_nums[-1] * 2**(len(ch_mult)-1))')
  tok = vqvae.Tokenizer(cfg)
  params = jax.tree_util.tree_map(
      jnp.asarray, convert.jax_tree_to_numpy(vqvae.init_params(cfg, jax.random.key(t.seed))['params']))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, warmup_steps=max(1, t.warmup_steps), decay_steps=max(t.steps, t.warmup_steps + 1),
      end_value=t.lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay))
  opt_state = tx.init(params)
  data = pipeline.create_dataset(config.data, split='train', batch_size=t.batch_size)
  writer = metric_writers.create_default_writer(
      os.path.join(workdir, 'tokenizer_logs'), just_logging=jax.process_index() > 0)
  rng = np.random.default_rng(t.seed)
  window_hits = np.zeros((len(cfg.patch_nums), cfg.vocab_size), np.int64)
  since_hit = np.zeros((cfg.vocab_size,), np.int64)
  sums: dict[str, float] = {}
  for step in range(1, t.steps + 1):
    images = jnp.asarray(next(data)['image'])
    params, opt_state, metrics = train_step(params, opt_state, images, tok=tok, tx=tx,
                                            l1=t.l1_weight, l2=t.l2_weight)
    hits = np.asarray(metrics.pop('hits_SV'))
    window_hits += hits
    since_hit = np.where(hits.sum(0) > 0, 0, since_hit + 1)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    if not np.isfinite(sums['loss']):
      raise FloatingPointError(f'tokenizer loss became {sums["loss"]} at step {step}; lower '
                               'tokenizer.lr or check the data')
    if t.restart_dead_every and step % t.restart_dead_every == 0 and step < 0.8 * t.steps:
      dead = since_hit >= t.restart_dead_every
      if dead.any():
        feats = np.asarray(_encoder_features(params, images, tok=tok))
        params = restart_dead_codes(params, dead, feats, rng)
        since_hit[dead] = 0
    if step % t.log_every == 0 or step == t.steps:
      n = t.log_every if step % t.log_every == 0 else step % t.log_every
      scalars = {f'tokenizer/{k}': v / n for k, v in sums.items()}
      scalars['tokenizer/psnr'] = float(10 * np.log10(4.0 / max(scalars['tokenizer/l2'], 1e-12)))
      scalars['tokenizer/usage'] = float((window_hits.sum(0) > 0).mean())
      for si, pn in enumerate(cfg.patch_nums):
        scalars[f'tokenizer/usage_{pn}x{pn}'] = float((window_hits[si] > 0).mean())
      scalars['tokenizer/lr'] = float(schedule(step))
      writer.write_scalars(step, scalars)
      sums, window_hits[:] = {}, 0
  writer.flush()
  if jax.process_index() == 0:
    convert.save_converted(out_dir, 'vqvae', cfg, params)
  return cfg, params


def default_tokenizer_train_config() -> ml_collections.ConfigDict:
  """Training fields of `config.tokenizer` (architecture fields are set by each config)."""
  c = ml_collections.ConfigDict()
  c.steps = 2000  # optimizer steps (0: do not train; `checkpoint` must then be given)
  c.batch_size = 64  # global batch
  c.lr = 1e-3  # peak learning rate (warm-up then cosine decay to 0.1x)
  c.warmup_steps = 100  # linear warm-up steps
  c.weight_decay = 0.0  # AdamW weight decay
  c.grad_clip = 1.0  # global gradient-norm clip
  c.l1_weight = 1.0  # weight of the L1 reconstruction loss
  c.l2_weight = 1.0  # weight of the L2 reconstruction loss
  c.restart_dead_every = 100  # restart codes unused for this many steps (0: never)
  c.log_every = 50  # steps between logged metrics
  c.seed = 0  # initialisation and dead-code restarts
  return c
