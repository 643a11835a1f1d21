"""Times the OFFICIAL PyTorch samplers (VAR with its KV cache, MVAR) on random weights.

    python launch/bench_official_torch.py --which=var  --src=/path/to/FoundationVision/VAR
    python launch/bench_official_torch.py --which=mvar --src=/path/to/CVL-UESTC/MVAR

The checkouts are the user's (we never ship their code). Each model runs in its own process
(both repositories have a top-level `models` package). Settings follow the official demos:
fp16 autocast, tf32 on, cfg 1.5, top-k 900, top-p 0.96, VQ-VAE decode to pixels included.
The official builders leave the VQ-VAE uninitialised (torch.empty); it is filled with small
normals here so that no NaN/inf reaches the timed code.

Official MVAR imports `natten.na2d`. Where NATTEN is not installed (e.g. a GPU machine with no
wheel for its torch/CUDA), `--natten_fallback` installs `launch/natten_fallback.py`'s masked-SDPA
stand-in (NATTEN's window rule, checked against NATTEN's own outputs in the tests); the row is
then labelled so. `bench_vs_official.py` is the full side-by-side; this script is its light
sampling-only sibling, one official model per process. Prints one RESULT json line and a one-line table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--which', choices=('var', 'mvar'), required=True)
  p.add_argument('--src', required=True, help='checkout of the official repository')
  p.add_argument('--depth', type=int, default=16)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--natten_fallback', action='store_true',
                 help='use the SDPA stand-in when natten is not importable')
  args = p.parse_args(argv)

  import torch
  sys.path.insert(0, args.src)
  na_label = ''
  if args.which == 'mvar':
    try:
      import natten  # noqa: F401
      na_label = 'natten'
    except ImportError:
      if not args.natten_fallback:
        raise SystemExit('official MVAR needs natten; pass --natten_fallback for the SDPA stand-in')
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      import natten_fallback
      na_label = natten_fallback.install('sdpa')

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.set_float32_matmul_precision('high')
  patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  common = dict(device=device, patch_nums=patch_nums, V=4096, Cvae=32, ch=160, share_quant_resi=4,
                num_classes=1000, depth=args.depth, shared_aln=False)
  if args.which == 'var':
    from models import build_vae_var
    vae, model = build_vae_var(**common)
  else:
    from models import build_vae_mvar
    vae, model = build_vae_mvar(**common, kernel_size=7, refine_step=8)
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for t in vae.parameters():
      t.copy_((torch.randn(t.shape, generator=gen) * 0.02).to(t.device))
    for t in vae.buffers():
      if t.is_floating_point():
        t.copy_((torch.randn(t.shape, generator=gen) * 0.02).to(t.device))
  vae.eval(), model.eval()
  labels = (torch.arange(args.batch, device=device) % 1000).long()

  def sample():
    with torch.inference_mode(), torch.autocast(device, enabled=device == 'cuda',
                                                 dtype=torch.float16, cache_enabled=True):
      if args.which == 'var':
        img = model.autoregressive_infer_cfg(B=args.batch, label_B=labels, g_seed=0, cfg=1.5,
                                             top_k=900, top_p=0.96)
      else:
        f_hat = model.autoregressive_infer(B=args.batch, label_B=labels, g_seed=0, cfg=1.5,
                                           top_k=900, top_p=0.96)
        img = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
    if device == 'cuda':
      torch.cuda.synchronize()
    return img

  t0 = time.perf_counter()
  img = sample()
  first_ms = (time.perf_counter() - t0) * 1e3
  assert torch.isfinite(img).all(), 'non-finite images'
  for _ in range(args.warmup):
    sample()
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    sample()
    times.append((time.perf_counter() - t0) * 1e3)
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else math.nan
  name = f'official {args.which.upper()}' + (f' ({na_label})' if na_label else '')
  dev = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
  result = dict(name=name, device=dev, torch=torch.__version__, depth=args.depth,
                batch=args.batch, first_ms=first_ms, median_ms=statistics.median(times),
                img_per_s=args.batch / statistics.median(times) * 1e3, peak_gib=peak)
  print('RESULT ' + json.dumps(result))
  print(f"{name:<50} b{args.batch} first {first_ms:8.1f} ms  median {result['median_ms']:8.1f} ms"
        f"  {result['img_per_s']:7.1f} img/s  peak {peak:6.2f} GiB  ({dev}, torch {torch.__version__})")


if __name__ == '__main__':
  main()
