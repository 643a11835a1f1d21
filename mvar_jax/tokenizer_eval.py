"""Reconstruction quality of a tokenizer on held-out images: the trainer's and main.py's.

    python main.py --mode=eval_tokenizer --config=configs/tokenizer.py --workdir=DIR \
        [--config.tokenizer.checkpoint=weights/vqvae]    # default: DIR/tokenizer

Measured on the first `tokenizer.eval_images` images of the data's 'val' split
(mvar_jax/recon_metrics.py): PSNR and SSIM of the clamped reconstructions, LPIPS when
`tokenizer.lpips_weights` names converted weights, rFID (Frechet distance between the
Inception pool features of the reconstructions and of the originals) when
`eval.inception` names the FID Inception weights, the high-frequency energy ratio, and
codebook usage and perplexity per scale. Eval mode prints a table and writes
`DIR/tokenizer_eval.json` (renamed into place whole).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mvar_jax import recon_metrics, xla_cpu


def heldout_images(data_cfg, num_images: int) -> np.ndarray | None:
  """The first `num_images` images (N, H, W, 3) float32 in [-1, 1] of the 'val' split.

  Every process reads the same images (the Inception extractor's `of_array` wants an array
  all processes can index, and every process then reports the same numbers). None (logged)
  when the data has no validation split.
  """
  from mvar_jax.data import pipeline
  try:
    it = pipeline.create_dataset(data_cfg, split='val', batch_size=min(num_images, 256),
                                 process_index=0, process_count=1, shuffle=False, repeat=False,
                                 drop_remainder=False)
    chunks, seen = [], 0
    for batch in it:
      chunks.append(np.asarray(batch['image'][:num_images - seen], np.float32))
      seen += len(chunks[-1])
      if seen >= num_images:
        break
  except FileNotFoundError as e:
    logging.warning('no validation split (%s): no reconstruction metrics', e)
    return None
  return np.concatenate(chunks) if chunks else None


@functools.lru_cache(maxsize=None)
def _jit_reconstruct(tok):
  """(params, images (B, H, W, C)) -> (ids per scale K x (B, pn*pn), reconstructions
  (B, H, W, C) clamped to [-1, 1]), jitted with the convolutional networks' XLA options."""
  def reconstruct(params, images_BHWC):
    ids, f_hat = tok.img_to_ids(params, images_BHWC, return_fhat=True)
    return ids, tok.fhat_to_img(params, f_hat)
  return jax.jit(reconstruct, compiler_options=xla_cpu.conv_net_options())


@functools.lru_cache(maxsize=None)
def _jit_apply(model):
  """`model.apply` (LPIPS) jitted with the convolutional networks' XLA options."""
  return jax.jit(model.apply, compiler_options=xla_cpu.conv_net_options())


def _to_uint8(images):
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def measure(tok, params, images_NHWC: np.ndarray, *, batch_size: int = 64, lpips=None,
            extractor=None) -> dict[str, Any]:
  """Reconstruction metrics of `tok` with `params` on images (N, H, W, C) in [-1, 1].

  lpips: (LPIPS module, params) or None; extractor: an evaluation.features.FeatureExtractor
  for rFID, or None. Returns floats (None for what is off) and per-scale lists.
  """
  n = len(images_NHWC)
  if n == 0:
    raise ValueError('no held-out images to measure the tokenizer on')
  k, v = len(tok.config.patch_nums), tok.config.vocab_size
  hits_SV = np.zeros((k, v), np.int64)
  recs = []
  for lo in range(0, n, batch_size):
    x = images_NHWC[lo:lo + batch_size]
    rows = len(x)
    if rows < batch_size:  # pad with copies: one compiled shape; the copies are not counted
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - rows, 0)])
    ids, rec = _jit_reconstruct(tok)(params, jnp.asarray(x))
    for si, ids_BL in enumerate(ids):
      hits_SV[si] += np.bincount(np.asarray(ids_BL)[:rows].ravel(), minlength=v)
    recs.append(np.asarray(rec)[:rows])
  rec = np.concatenate(recs)
  x = images_NHWC
  out: dict[str, Any] = {'num_images': n}
  out['psnr'] = float(np.mean(recon_metrics.psnr(jnp.asarray(x), jnp.asarray(rec))))
  side = min(x.shape[1:3])
  out['ssim'] = (float(np.mean(recon_metrics.ssim(jnp.asarray(x), jnp.asarray(rec))))
                 if side >= 11 else None)  # the 11x11 window needs 11 px
  out['hf_ratio'] = recon_metrics.high_frequency_ratio(rec, x)
  out['lpips'] = None
  if lpips is not None and lpips[0] is not None:
    model, lp_params = lpips
    apply = _jit_apply(model)
    out['lpips'] = float(np.mean(np.concatenate([
        np.asarray(apply({'params': lp_params}, jnp.asarray(x[i:i + batch_size]),
                         jnp.asarray(rec[i:i + batch_size]))) for i in range(0, n, batch_size)])))
  out['rfid'] = None
  if extractor is not None:
    from mvar_jax.evaluation import metrics
    if n < 2:
      raise ValueError(f'rFID needs >= 2 held-out images, got {n}')
    real = extractor.of_array(_to_uint8(x), progress=False)['pool']
    fake = extractor.of_array(_to_uint8(rec), progress=False)['pool']
    out['rfid'] = metrics.frechet_distance_of_features(fake, *metrics.statistics(real))
  stats = recon_metrics.codebook_stats(hits_SV)
  out['usage'], out['perplexity'] = stats['usage'], stats['perplexity']
  out['patch_nums'] = list(tok.config.patch_nums)
  out['usage_per_scale'] = [float(u) for u in stats['usage_S']]
  out['perplexity_per_scale'] = [float(p) for p in stats['perplexity_S']]
  return out


def scalars(results: dict[str, Any]) -> dict[str, float]:
  """The scalar entries of `measure`'s result (what is off left out), per scale flattened."""
  out = {k: float(v) for k, v in results.items()
         if isinstance(v, (int, float)) and k != 'num_images' and v is not None}
  for pn, u, p in zip(results['patch_nums'], results['usage_per_scale'],
                      results['perplexity_per_scale']):
    out[f'usage_{pn}x{pn}'], out[f'perplexity_{pn}x{pn}'] = u, p
  return out


def _inception_extractor(config):
  e = config.get('eval')
  if e is None or not e.get('inception', ''):
    return None
  from mvar_jax.evaluation import evaluators, features, inception
  evaluators.validate_eval_config(e)
  net_cfg = inception.InceptionConfig(preprocess=e.preprocess, precision=e.precision).validate()
  return features.FeatureExtractor(inception.load_params(e.inception), net_cfg,
                                   per_device_batch=e.inception_batch_size)


def from_config(config, tok, *, lpips=None, with_rfid: bool = True) -> Callable | None:
  """params -> measure(...) on the configured held-out images; None when there are none
  (tokenizer.eval_images = 0 or no 'val' split)."""
  t = config.tokenizer
  num = int(t.get('eval_images', 256))
  if num <= 0:
    return None
  images = heldout_images(config.data, num)
  if images is None:
    return None
  extractor = _inception_extractor(config) if with_rfid else None
  batch = int(t.get('eval_batch_size', 64))
  return lambda params: measure(tok, params, images, batch_size=batch, lpips=lpips,
                                extractor=extractor)


def format_table(results: dict[str, Any], *, lpips_note: str, rfid_note: str) -> str:
  """A plain-text table of `measure`'s result."""
  fmt = lambda v, note='': f'{v:.4f}' if isinstance(v, float) else (note or 'n/a')
  lines = [f'held-out images  {results["num_images"]}',
           f'PSNR (dB)        {fmt(results["psnr"])}',
           f'SSIM             {fmt(results["ssim"], "off (images < 11 px)")}',
           f'LPIPS            {fmt(results["lpips"], lpips_note)}',
           f'rFID             {fmt(results["rfid"], rfid_note)}',
           f'HF energy ratio  {fmt(results["hf_ratio"])}',
           f'codebook usage   {results["usage"]:.4f} (perplexity {results["perplexity"]:.1f})',
           '', 'scale   usage    perplexity']
  for pn, u, p in zip(results['patch_nums'], results['usage_per_scale'],
                      results['perplexity_per_scale']):
    lines.append(f'{pn:>2}x{pn:<3}  {u:.4f}   {p:9.1f}')
  return '\n'.join(lines)


def run(config, workdir: str) -> dict[str, Any]:
  """main.py --mode=eval_tokenizer: measures the tokenizer of `tokenizer.checkpoint` (or
  `workdir/tokenizer`), prints the table, writes `workdir/tokenizer_eval.json`."""
  from mvar_jax import api, atomic_file, vqvae
  t = config.tokenizer
  path = t.get('checkpoint', '') or os.path.join(workdir, 'tokenizer')
  if not os.path.exists(os.path.join(path, 'vqvae.msgpack')):
    raise FileNotFoundError(f'no tokenizer at {path} (vqvae.msgpack); train one with '
                            f'--config.tokenizer_only=True or set --config.tokenizer.checkpoint')
  cfg, params = api.load_converted(path, 'vqvae')
  if config.data.image_size != cfg.resolution:
    raise ValueError(f'data.image_size={config.data.image_size} must equal the resolution '
                     f'{cfg.resolution} of the tokenizer in {path}')
  if int(t.get('eval_images', 256)) <= 0:
    raise ValueError(f'tokenizer.eval_images must be > 0 in eval mode, got {t.eval_images}')
  lp = (None, None)
  if t.get('lpips_weights', ''):
    from mvar_jax import lpips
    lp = (lpips.LPIPS(t.get('precision', 'highest')), lpips.load_params(t.lpips_weights))
  evaluate = from_config(config, vqvae.Tokenizer(cfg), lpips=lp)
  if evaluate is None:
    raise FileNotFoundError(f'data {config.data.name!r} has no validation split to evaluate on')
  results = evaluate(params)
  results['tokenizer'] = path
  results['lpips_weights'] = t.get('lpips_weights', '') or None
  results['inception'] = config.get('eval', {}).get('inception', '') or None
  print(format_table(results,
                     lpips_note='off (no tokenizer.lpips_weights; see python -m mvar_jax.lpips)',
                     rfid_note='off (no eval.inception: FID Inception weights)'), flush=True)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, 'tokenizer_eval.json')
    atomic_file.write_atomically(out, lambda f: f.write(json.dumps(results, indent=2).encode()))
    logging.info('wrote %s', out)
  return results
