"""Training VAR's multi-scale VQ-VAE (the official repositories ship only weights).

    python main.py --config=configs/tokenizer.py --workdir=DIR   # or as the demo's first stage

The loss is the recipe of the config's loss fields (mvar_jax/tokenizer_recipes.py; the
step is mvar_jax/tokenizer_step.gan_train_step): L1 + L2 + VQ (commitment and codebook
terms averaged over scales, VAR's semantics; straight-through estimator), plus LPIPS
when `perceptual_weight` > 0 and `lpips_weights` names converted weights, plus a hinge
patch-GAN term from `disc_start` on when `disc_weight` > 0. `disc_start` is compared
with the global step, which is part of the checkpointed state, so a resumed run enters
the GAN phase at the same step. Codes that no batch used for `restart_dead_every` steps
are restarted on random encoder outputs (a standard remedy for codebook collapse in small
codebooks; VAR relies on size).

Logged (CLU writer, `DIR/tokenizer_logs`): the losses, codebook usage and perplexity per
scale over the last logging window, and every `eval_every` steps the reconstruction
metrics of mvar_jax/tokenizer_eval.py (PSNR, SSIM, LPIPS when configured) on
`eval_images` held-out images.

The result is written like a converted checkpoint (`DIR/tokenizer/vqvae.{msgpack,json}`,
renamed into place whole), so the MVAR trainer, the sampler and
`mvar_jax.api.load_pretrained` read it the same way. Training checkpoints (params,
optimiser state, discriminator params and optimiser state, dead-code statistics, log
window) go to `DIR/tokenizer_train/checkpoints` every `tokenizer.checkpoint_every` steps
and on SIGTERM, through mvar_jax/lifecycle.py (workdir lock, NaN guard, verified restore
with fallback, exit codes).
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

from mvar_jax import config_utils, convert, lifecycle, recon_metrics, tokenizer_recipes
from mvar_jax import tokenizer_step as ts
from mvar_jax import vqvae, xla_cpu
from mvar_jax.data import sources

# gan_train_step's state; the trainer adds the step counter and the codebook statistics.
_GAN_KEYS = ('params', 'opt_state', 'disc_params', 'disc_opt_state')


def vqvae_config_from(config: ml_collections.ConfigDict) -> vqvae.VQVAEConfig:
  """The tokenizer architecture of a run config (fields under `config.tokenizer`)."""
  t = config.tokenizer
  return vqvae.VQVAEConfig(
      ch=t.ch, ch_mult=tuple(t.ch_mult), num_res_blocks=t.num_res_blocks,
      z_channels=t.z_channels, vocab_size=t.vocab_size, patch_nums=tuple(t.patch_nums),
      num_phi=t.get('num_phi', 4), using_sa=t.get('using_sa', True),
      using_mid_sa=t.get('using_mid_sa', True), beta=t.get('beta', 0.25),
      precision=t.get('precision', 'highest'))


def train_step(state, images, lpips_params=None, *, tok, tx, disc, disc_tx, weights,
               lpips_model):
  """One generator (+ discriminator) step plus the codebook statistics; (state, metrics).

  state: gan_train_step's dict plus 'step' () int32 steps done, 'since_hit' (V,) int32
  steps since each code was last used, 'window_hits' (S, V) int32 uses per scale in the
  current log window. The GAN terms are on when state['step'] >= weights.disc_start.
  """
  gan_state, metrics = ts.gan_train_step(
      {k: state[k] for k in _GAN_KEYS}, images, state['step'], lpips_params, tok=tok, tx=tx,
      disc=disc, disc_tx=disc_tx, weights=weights, lpips_model=lpips_model)
  hits_SV = metrics.pop('hits_SV').astype(jnp.int32)
  since_hit = jnp.where(hits_SV.sum(0) > 0, 0, state['since_hit'] + 1)
  return dict(gan_state, step=state['step'] + 1, since_hit=since_hit,
              window_hits=state['window_hits'] + hits_SV), metrics


def jit_train_step(**setup):
  """`train_step` jitted for one set-up (its keyword arguments), the state donated, with the
  VQ-VAE's XLA options (on CPU: Eigen's convolutions; the demo's tokenizer step took 629
  instead of 890 ms, launch/results/cpu_2026-11-28.md)."""
  return jax.jit(functools.partial(train_step, **setup), donate_argnums=(0,),
                 compiler_options=xla_cpu.conv_net_options())


@functools.lru_cache(maxsize=None)
def _jit_encoder_features(tok):
  """(params, images (B, H, W, 3)) -> the encoder's outputs (B * h * w, Cvae), jitted with the
  convolutional networks' XLA options."""
  return jax.jit(lambda params, images: tok.encode(params, images).reshape(
      -1, tok.config.z_channels), compiler_options=xla_cpu.conv_net_options())


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
  for name in ('eval_every', 'eval_images'):
    if t.get(name, 0) < 0:
      raise ValueError(f'tokenizer.{name} must be >= 0, got {t[name]}')
  if t.get('disc_weight', 0.0):
    layers = t.get('disc_layers', 3)
    if layers < 1 or cfg.resolution < 3 * 2 ** layers:  # logits side: H / 2**layers - 2
      raise ValueError(f'tokenizer.disc_layers={layers} leaves no patch logits at '
                       f'{cfg.resolution} px; allowed: 1 <= disc_layers <= '
                       f'{int(np.log2(max(cfg.resolution // 3, 1)))}')
  if t.get('codebook_l2_norm', False) or t.get('codebook_dim', 0):
    raise ValueError('tokenizer.codebook_l2_norm / codebook_dim are recorded from LlamaGen\'s '
                     'recipe but not implemented (VAR\'s quantizer); set them to False / 0')


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


def _codebook_scalars(window_hits_SV, patch_nums) -> dict[str, float]:
  stats = recon_metrics.codebook_stats(window_hits_SV)
  out = {'tokenizer/usage': stats['usage'], 'tokenizer/perplexity': stats['perplexity']}
  for si, pn in enumerate(patch_nums):
    out[f'tokenizer/usage_{pn}x{pn}'] = float(stats['usage_S'][si])
    out[f'tokenizer/perplexity_{pn}x{pn}'] = float(stats['perplexity_S'][si])
  return out


# Checkpoints leave out what the plain recipe keeps empty (no discriminator): Orbax stores
# leaves, and a restored tree must have the saved one's structure.
def _to_save(state: dict) -> dict:
  return {k: v for k, v in state.items() if not (isinstance(v, dict) and not v)}


def _from_saved(saved: dict) -> dict:
  return dict({'disc_params': {}, 'disc_opt_state': {}}, **saved)


def train_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or reloads, when `workdir/tokenizer` holds a result) the tokenizer.

  Resumes from `workdir/tokenizer_train/checkpoints` (saved every
  tokenizer.checkpoint_every steps and on SIGTERM): with in-memory data ('builtin') the
  batch of step s and the dead-code restarts are pure functions of (seed, s), so a resumed
  run ends with the same params as one that never stopped, in the GAN phase too; streaming
  data ('folder', 'imagenet2012') resume at the start of the epoch with a fresh shuffle
  (sources.IteratorSource). Returns (VQVAEConfig, params). Raises lifecycle.Preempted
  after saving on SIGTERM, lifecycle.NonFiniteError on NaN/Inf.
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
  weights = ts.LossWeights.from_config(t)
  disc, disc_tx = ts.discriminator_from_config(t)
  lpips_model, lpips_params = ts.lpips_from_config(t)
  logging.info('tokenizer loss: %s; discriminator: %s; LPIPS: %s', weights,
               disc.config if disc is not None else 'off',
               t.lpips_weights if lpips_model is not None else 'off')
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, warmup_steps=max(1, t.warmup_steps), decay_steps=max(t.steps, t.warmup_steps + 1),
      end_value=t.lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay))
  source = sources.make_train_source(config.data, int(t.batch_size))
  step_fn = jit_train_step(tok=tok, tx=tx, disc=disc, disc_tx=disc_tx, weights=weights,
                           lpips_model=lpips_model)
  from mvar_jax import tokenizer_eval
  evaluate = tokenizer_eval.from_config(config, tok, lpips=(lpips_model, lpips_params),
                                        with_rfid=False)

  def init(key):
    params = nn.unbox(vqvae.init_params(cfg, key)['params'])
    state = ts.init_state(params, tx, disc, disc_tx, jax.random.fold_in(key, 1),
                          (cfg.resolution, cfg.resolution, 3))
    return dict(state, step=jnp.zeros((), jnp.int32),
                since_hit=jnp.zeros((cfg.vocab_size,), jnp.int32),
                window_hits=jnp.zeros((len(cfg.patch_nums), cfg.vocab_size), jnp.int32))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      _to_save(jax.eval_shape(init, jax.random.key(0))))

  with lifecycle.Run(os.path.join(workdir, 'tokenizer_train'), 'checkpoints', total_steps=t.steps,
                     max_to_keep=2, async_save=False,
                     logdir=os.path.join(workdir, 'tokenizer_logs')) as run:
    restored = run.restore(abstract)
    if restored is None:
      state, sums = jax.jit(init, out_shardings=device)(jax.random.key(t.seed)), {}
    else:
      state, meta = _from_saved(restored[0]), restored[1]
      sums = {k: float(v) for k, v in meta.get('sums', {}).items()}
    step = int(jax.device_get(state['step']))
    hooks = run.progress_hooks()
    while step < t.steps:
      images = jnp.asarray(source.batch(step)['image'])
      state, metrics = step_fn(state, images, lpips_params)
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
          feats = np.asarray(_jit_encoder_features(tok)(state['params'], images))
          rng = np.random.default_rng([t.seed, step])  # a pure function of (seed, step)
          state['params'] = jax.device_put(
              restart_dead_codes(state['params'], dead, feats, rng), device)
          state['since_hit'] = jnp.where(jnp.asarray(dead), 0, state['since_hit'])
      for hook in hooks:
        hook(step)
      if step % t.log_every == 0 or step == t.steps:
        n = t.log_every if step % t.log_every == 0 else step % t.log_every
        scalars = {f'tokenizer/{k}': v / n for k, v in sums.items()}
        scalars['tokenizer/psnr'] = float(10 * np.log10(4.0 / max(scalars['tokenizer/l2'], 1e-12)))
        scalars.update(_codebook_scalars(np.asarray(state['window_hits']), cfg.patch_nums))
        scalars['tokenizer/lr'] = float(schedule(step))
        run.writer.write_scalars(step, scalars)
        sums = {}
        state['window_hits'] = jnp.zeros_like(state['window_hits'])
      if evaluate is not None and ((t.eval_every and step % t.eval_every == 0) or
                                   step == t.steps):
        results = evaluate(state['params'])
        run.writer.write_scalars(step, {f'tokenizer_eval/{k}': v for k, v in
                                        tokenizer_eval.scalars(results).items()})
      stop = run.should_stop(step)
      if (step % t.checkpoint_every == 0 and step < t.steps) or stop:
        run.save(step, _to_save(state), meta={'sums': sums})
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
  """Training fields of `config.tokenizer` (architecture fields are set by each config).

  The loss fields are those of tokenizer_recipes.loss_fields('plain') (L1 + L2 + VQ);
  a config selects another recipe with `t.update(tokenizer_recipes.loss_fields(name))`.
  """
  c = ml_collections.ConfigDict()
  c.steps = 2000  # optimizer steps (0: do not train; `checkpoint` must then be given)
  c.batch_size = 64  # global batch
  c.lr = 1e-3  # peak learning rate (warm-up then cosine decay to 0.1x)
  c.warmup_steps = 100  # linear warm-up steps
  c.weight_decay = 0.0  # AdamW weight decay
  c.grad_clip = 1.0  # global gradient-norm clip (generator and discriminator)
  c.update(tokenizer_recipes.loss_fields('plain'))
  c.restart_dead_every = 100  # restart codes unused for this many steps (0: never)
  c.log_every = 50  # steps between logged metrics
  c.eval_every = 0  # steps between held-out reconstruction metrics (0: only at the end)
  c.eval_images = 256  # held-out (data 'val' split) images for those metrics (0: none)
  c.eval_batch_size = 64  # images per reconstruction call while evaluating
  c.checkpoint_every = 500  # steps between checkpoints (and one on SIGTERM) for exact resume
  c.seed = 0  # initialisation and dead-code restarts
  return c
