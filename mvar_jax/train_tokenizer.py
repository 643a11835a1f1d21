"""Training VAR's multi-scale VQ-VAE (the official repositories ship only weights).

    python main.py --config=configs/tokenizer.py --workdir=DIR   # or as the demo's first stage

Loss = l1 * |x - x_rec| + l2 * (x - x_rec)^2 + vq (commitment and codebook terms
averaged over scales, VAR's semantics; straight-through estimator). Codes that no
batch used for `restart_dead_every` steps are restarted on random encoder outputs
(a standard remedy for codebook collapse in small codebooks; VAR relies on size).
Logged: reconstruction and VQ losses, PSNR, codebook usage (share of codes hit in the
last logging window, per scale and overall).

The result is written like a converted checkpoint (`DIR/tokenizer/vqvae.{msgpack,json}`,
renamed into place whole), so the MVAR trainer, the sampler and
`mvar_jax.api.load_pretrained` read it the same way. Training checkpoints (params,
optimiser state, dead-code statistics, log window) go to `DIR/tokenizer_train/checkpoints`
every `tokenizer.checkpoint_every` steps and on SIGTERM, through mvar_jax/lifecycle.py
(workdir lock, NaN guard, verified restore with fallback, exit codes).
"""

from __future__ import annotations

import functools
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mvar_jax import config_utils, convert, lifecycle, vqvae
from mvar_jax.data import sources


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


@functools.partial(jax.jit, static_argnames=('tok', 'tx', 'l1', 'l2'), donate_argnums=(0,))
def train_step(state, images, *, tok, tx, l1, l2):
  """One AdamW step plus the codebook statistics; returns (state, metrics).

  state: {'params', 'opt_state', 'step', 'since_hit' (V,) int32 steps since each code was
  last used, 'window_hits' (S, V) int32 uses per scale in the current log window}.
  """
  grads, metrics = jax.grad(functools.partial(_loss_fn, tok=tok, l1=l1, l2=l2), has_aux=True)(
      state['params'], images)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  hits_SV = metrics.pop('hits_SV').astype(jnp.int32)
  since_hit = jnp.where(hits_SV.sum(0) > 0, 0, state['since_hit'] + 1)
  metrics['grad_norm'] = optax.global_norm(grads)
  return dict(params=params, opt_state=opt_state, step=state['step'] + 1, since_hit=since_hit,
              window_hits=state['window_hits'] + hits_SV), metrics


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


def _validate(config, cfg: vqvae.VQVAEConfig) -> None:
  t = config.tokenizer
  config_utils.check_finite_floats(t, 'tokenizer')
  if config.data.image_size != cfg.resolution:
    raise ValueError(f'data.image_size={config.data.image_size} must equal the tokenizer '
                     f'resolution {cfg.resolution} (patch_nums[-1] * 2**(len(ch_mult)-1))')
  if t.lr <= 0:
    raise ValueError(f'tokenizer.lr must be > 0, got {t.lr}')
  for name in ('batch_size', 'log_every', 'checkpoint_every'):
    if t[name] <= 0:
      raise ValueError(f'tokenizer.{name} must be > 0, got {t[name]}')


def export_atomically(out_dir: str, cfg: vqvae.VQVAEConfig, params) -> None:
  """Writes vqvae.{msgpack,json} into a fresh temporary directory, then renames it to out_dir.

  A kill at any moment leaves either no out_dir or a whole one (a stale temporary
  directory is ignored and replaced by the next export).
  """
  tmp = f'{out_dir}.tmp-{os.getpid()}'
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  convert.save_converted(tmp, 'vqvae', cfg, params)
  if os.path.exists(out_dir):  # an earlier, incomplete result (no msgpack): keep it aside
    os.rename(out_dir, f'{out_dir}.incomplete-{int(time.time())}')
  os.rename(tmp, out_dir)


def train_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or reloads, when `workdir/tokenizer` holds a result) the tokenizer.

  Resumes from `workdir/tokenizer_train/checkpoints` (saved every
  tokenizer.checkpoint_every steps and on SIGTERM): with in-memory data ('builtin') the
  batch of step s and the dead-code restarts are pure functions of (seed, s), so a resumed
  run ends with the same params as one that never stopped; streaming data ('folder',
  'imagenet2012') resume at the start of the epoch with a fresh shuffle (sources.IteratorSource). Returns (VQVAEConfig, params). Raises
  lifecycle.Preempted after saving on SIGTERM, lifecycle.NonFiniteError on NaN/Inf.
  """
  workdir = os.path.abspath(workdir)
  out_dir = os.path.join(workdir, 'tokenizer')
  if os.path.exists(os.path.join(out_dir, 'vqvae.msgpack')):
    from mvar_jax import api
    logging.info('tokenizer: reusing %s', out_dir)
    return api.load_converted(out_dir, 'vqvae')
  t = config.tokenizer
  cfg = vqvae_config_from(config)
  _validate(config, cfg)
  tok = vqvae.Tokenizer(cfg)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, warmup_steps=max(1, t.warmup_steps), decay_steps=max(t.steps, t.warmup_steps + 1),
      end_value=t.lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay))
  source = sources.make_train_source(config.data, int(t.batch_size))
  num_scales = len(cfg.patch_nums)

  def init(key):
    params = nn.unbox(vqvae.init_params(cfg, key)['params'])
    return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                since_hit=jnp.zeros((cfg.vocab_size,), jnp.int32),
                window_hits=jnp.zeros((num_scales, cfg.vocab_size), jnp.int32))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      jax.eval_shape(init, jax.random.key(0)))

  with lifecycle.Run(os.path.join(workdir, 'tokenizer_train'), 'checkpoints', total_steps=t.steps,
                     max_to_keep=2, async_save=False,
                     logdir=os.path.join(workdir, 'tokenizer_logs')) as run:
    restored = run.restore(abstract)
    if restored is None:
      state, sums = jax.jit(init, out_shardings=device)(jax.random.key(t.seed)), {}
    else:
      state, meta = restored
      sums = {k: float(v) for k, v in meta.get('sums', {}).items()}
    step = int(jax.device_get(state['step']))
    hooks = run.progress_hooks()
    while step < t.steps:
      images = jnp.asarray(source.batch(step)['image'])
      state, metrics = train_step(state, images, tok=tok, tx=tx, l1=t.l1_weight, l2=t.l2_weight)
      step += 1
      for k, v in jax.device_get(metrics).items():
        sums[k] = sums.get(k, 0.0) + float(v)
      if not np.isfinite(sums['loss']):
        raise lifecycle.NonFiniteError(
            f'tokenizer loss became {sums["loss"]} at step {step}; lower tokenizer.lr or check '
            f'the data. Last good checkpoint: {run.last_good()}')
      if t.restart_dead_every and step % t.restart_dead_every == 0 and step < 0.8 * t.steps:
        dead = np.asarray(state['since_hit']) >= t.restart_dead_every
        if dead.any():
          feats = np.asarray(_encoder_features(state['params'], images, tok=tok))
          rng = np.random.default_rng([t.seed, step])  # a pure function of (seed, step)
          state['params'] = jax.device_put(
              restart_dead_codes(state['params'], dead, feats, rng), device)
          state['since_hit'] = jnp.where(jnp.asarray(dead), 0, state['since_hit'])
      for hook in hooks:
        hook(step)
      if step % t.log_every == 0 or step == t.steps:
        n = t.log_every if step % t.log_every == 0 else step % t.log_every
        window_hits = np.asarray(state['window_hits'])
        scalars = {f'tokenizer/{k}': v / n for k, v in sums.items()}
        scalars['tokenizer/psnr'] = float(10 * np.log10(4.0 / max(scalars['tokenizer/l2'], 1e-12)))
        scalars['tokenizer/usage'] = float((window_hits.sum(0) > 0).mean())
        for si, pn in enumerate(cfg.patch_nums):
          scalars[f'tokenizer/usage_{pn}x{pn}'] = float((window_hits[si] > 0).mean())
        scalars['tokenizer/lr'] = float(schedule(step))
        run.writer.write_scalars(step, scalars)
        sums = {}
        state['window_hits'] = jnp.zeros_like(state['window_hits'])
      stop = run.should_stop(step)
      if (step % t.checkpoint_every == 0 and step < t.steps) or stop:
        run.save(step, state, meta={'sums': sums})
      if stop and step < t.steps:
        raise run.preempted(step)
    params = jax.device_get(state['params'])
    if not lifecycle.all_finite(params):
      raise lifecycle.NonFiniteError(f'tokenizer params hold NaN/Inf after step {step}; not '
                                     f'exported. Last good checkpoint: {run.last_good()}')
    if jax.process_index() == 0:
      export_atomically(out_dir, cfg, params)
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
  c.checkpoint_every = 500  # steps between checkpoints (and one on SIGTERM) for exact resume
  c.seed = 0  # initialisation and dead-code restarts
  return c
