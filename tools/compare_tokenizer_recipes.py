"""Demo-scale tokenizer: L1 + L2 + VQ against the full recipe (+ LPIPS + GAN), same step budget.

    python tools/compare_tokenizer_recipes.py --steps 300 --out /tmp/recipes.json

Trains the demo's tokenizer (configs/demo.py) on the built-in shapes twice from the same
initialisation and batches, once per recipe of `mvar_jax.tokenizer_recipes` ('plain',
'demo'), with `mvar_jax.tokenizer_step.gan_train_step` and the trainer's dead-code restart,
then evaluates on held-out built-in images: PSNR, SSIM, LPIPS, high-frequency energy ratio,
codebook usage and perplexity per scale, and the time per step after compilation.

No ImageNet VGG weights are used (nothing is downloaded): LPIPS runs on a randomly
initialised VGG16 trunk with the `lpips` package's shipped heads when it is installed (a
fixed feature metric, not the calibrated one). The full recipe trains on that metric, so
the table also reports LPIPS under a second, independent random trunk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import demo as demo_config  # noqa: E402
from mvar_jax import convert, lpips, recon_metrics, tokenizer_recipes  # noqa: E402
from mvar_jax import tokenizer_step as ts, train_tokenizer, vqvae  # noqa: E402
from mvar_jax.data import pipeline  # noqa: E402


def train_one(recipe: str, config, steps: int, lpips_params, val_images, overrides=(),
              eval_every=0, lpips_sets=None):
  t = config.tokenizer
  t.update(tokenizer_recipes.loss_fields(recipe, steps=steps))
  if recipe != 'plain':  # tuning the full recipe: --set disc_start=200 --set disc_weight=0.1
    for item in overrides:
      key, value = item.split('=', 1)
      t[key] = type(t[key])(value)
  t.steps = steps
  t.lpips_weights = 'random-vgg'  # in-memory params below (not a file)
  cfg = train_tokenizer.vqvae_config_from(config)
  tok = vqvae.Tokenizer(cfg)
  params = jax.tree_util.tree_map(jnp.asarray, convert.jax_tree_to_numpy(
      vqvae.init_params(cfg, jax.random.key(t.seed))['params']))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, warmup_steps=max(1, t.warmup_steps), decay_steps=max(steps, t.warmup_steps + 1),
      end_value=t.lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay))
  weights = ts.LossWeights.from_config(t)
  disc, disc_tx = ts.discriminator_from_config(t)
  lp_model = lpips.LPIPS() if weights.perceptual else None
  state = ts.init_state(params, tx, disc, disc_tx, jax.random.key(t.seed + 1),
                        (cfg.resolution, cfg.resolution, 3))
  data = pipeline.create_dataset(config.data, split='train', batch_size=t.batch_size)
  rng = np.random.default_rng(t.seed)
  since_hit = np.zeros((cfg.vocab_size,), np.int64)
  times, last = [], {}
  for step in range(1, steps + 1):
    images = jnp.asarray(next(data)['image'])
    t0 = time.perf_counter()
    state, m = ts.gan_train_step(state, images, jnp.int32(step - 1), lpips_params, tok=tok, tx=tx,
                                 disc=disc, disc_tx=disc_tx, weights=weights,
                                 lpips_model=lp_model)
    hits = np.asarray(m.pop('hits_SV'))  # blocks until the step is done
    times.append((step, time.perf_counter() - t0))
    since_hit = np.where(hits.sum(0) > 0, 0, since_hit + 1)
    if t.restart_dead_every and step % t.restart_dead_every == 0 and step < 0.8 * steps:
      dead = since_hit >= t.restart_dead_every
      if dead.any():
        feats = np.asarray(train_tokenizer._jit_encoder_features(tok)(state['params'], images))
        state['params'] = train_tokenizer.restart_dead_codes(state['params'], dead, feats, rng)
        since_hit[dead] = 0
    if step % 50 == 0 or step == steps:
      last = {k: float(v) for k, v in m.items()}
      print(f'{recipe} step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in sorted(last.items())),
            flush=True)
    if eval_every and step % eval_every == 0 and step < steps:  # progress on held-out images
      held_out = evaluate(tok, cfg, state['params'], val_images, lpips_sets)
      print(f'{recipe} step {step} held-out: ' + ', '.join(
          f'{k} {held_out[k]:.4f}' for k in ('psnr', 'ssim', 'hf_ratio', *lpips_sets)), flush=True)
  # The step (global index step - 1, as the trainer's) compiles once for both phases; drop the
  # first step and the first GAN step from the timing.
  gan_from = weights.disc_start + 1 if weights.disc else steps + 1  # first GAN step (1-based)
  pre = [d for s, d in times if 1 < s < gan_from]
  post = [d for s, d in times if s > gan_from]
  return tok, cfg, state['params'], dict(
      step_s_before_gan=float(np.median(pre)) if pre else None,
      step_s_with_gan=float(np.median(post)) if post else None, final_train_metrics=last)


def evaluate(tok, cfg, params, val_images, lpips_sets):
  rec_list, hits = [], np.zeros((len(cfg.patch_nums), cfg.vocab_size), np.int64)
  for i in range(0, len(val_images), 64):
    x = jnp.asarray(val_images[i:i + 64])
    rec, _, h = tok(params, x)
    rec_list.append(np.asarray(jnp.clip(rec, -1, 1)))
    hits += np.asarray(h, np.int64)
  rec = np.concatenate(rec_list)
  x = jnp.asarray(val_images)
  out = dict(psnr=float(jnp.mean(recon_metrics.psnr(x, jnp.asarray(rec)))),
             ssim=float(jnp.mean(recon_metrics.ssim(x, jnp.asarray(rec)))),
             hf_ratio=recon_metrics.high_frequency_ratio(rec, val_images))
  apply = jax.jit(lpips.LPIPS().apply)
  for name, lp in lpips_sets.items():
    out[name] = float(np.mean([np.asarray(apply({'params': lp}, x[i:i + 64], rec[i:i + 64]))
                               for i in range(0, len(rec), 64)]))
  stats = recon_metrics.codebook_stats(hits)
  out['usage_per_scale'] = [round(float(u), 3) for u in stats['usage_S']]
  out['perplexity_per_scale'] = [round(float(p), 1) for p in stats['perplexity_S']]
  out['usage'] = stats['usage']
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--batch', type=int, default=32, help='training batch (the demo uses 32)')
  p.add_argument('--val', type=int, default=256, help='held-out images')
  p.add_argument('--recipes', default='plain,demo')
  p.add_argument('--out', default='')
  p.add_argument('--eval_every', type=int, default=0,
                 help='steps between held-out evaluations during training (0: only at the end)')
  p.add_argument('--set', action='append', default=[],
                 help='tokenizer field=value applied to the non-plain recipes (repeatable)')
  args = p.parse_args(argv)
  lp_train, heads = lpips.random_params(0)
  lp_other, _ = lpips.random_params(1)
  config = demo_config.get_config()
  val = next(pipeline.create_dataset(config.data, split='val', batch_size=args.val,
                                     shuffle=False, repeat=False))['image']
  results = {}
  lpips_sets = {'lpips': lp_train, 'lpips_other_trunk': lp_other}
  for recipe in args.recipes.split(','):
    c = demo_config.get_config()
    c.tokenizer.batch_size = args.batch
    tok, cfg, params, timing = train_one(recipe, c, args.steps, lp_train, np.asarray(val),
                                         args.set, args.eval_every, lpips_sets)
    results[recipe] = dict(timing, **evaluate(tok, cfg, params, np.asarray(val), lpips_sets))
    print(recipe, json.dumps(results[recipe]), flush=True)
  print(f'\n{args.steps} steps, batch {args.batch}, {args.val} held-out images, '
        f'LPIPS: random VGG16 + {heads}; device {jax.devices()[0].device_kind}')
  cols = ('psnr', 'ssim', 'lpips', 'lpips_other_trunk', 'hf_ratio', 'usage', 'step_s_before_gan',
          'step_s_with_gan')
  print('| recipe | ' + ' | '.join(cols) + ' | usage per scale | perplexity per scale |')
  print('|' + '---|' * (len(cols) + 3))
  for r, v in results.items():
    cells = [f'{v[c]:.4f}' if isinstance(v[c], float) else str(v[c]) for c in cols]
    print(f'| {r} | ' + ' | '.join(cells) + f" | {v['usage_per_scale']} | "
          f"{v['perplexity_per_scale']} |")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
