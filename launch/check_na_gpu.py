"""Checks the compiled Pallas neighbourhood-attention kernel on a real GPU against the reference.

    python launch/check_na_gpu.py            # on a GPU; prints one line per case, exits 1 on a miss

The CPU tests run the kernel in interpret mode; this runs the Triton build on the device, outputs
and gradients (random cotangents), against the gather reference in fp32 at 'highest' matmul
precision on the same rounded inputs. Every case draws fresh inputs and poisons nothing by
accident: inputs are unit normals, never zeros. Error = max|x - ref| / max|ref|.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mvar_jax.kernels.neighborhood_attention import pallas_kernel  # noqa: E402
from mvar_jax.kernels.neighborhood_attention import reference  # noqa: E402

# (height, width, kernel, batch, heads, head_dim, dtype, tolerance)
CASES = [
    (16, 16, 7, 4, 16, 64, jnp.bfloat16, 2e-2),
    (13, 13, 7, 4, 16, 64, jnp.bfloat16, 2e-2),
    (32, 32, 7, 2, 16, 64, jnp.bfloat16, 2e-2),
    (16, 16, 7, 2, 8, 128, jnp.bfloat16, 2e-2),
    (13, 16, 5, 2, 4, 64, jnp.float16, 2e-2),
    (16, 16, 7, 2, 4, 64, jnp.float32, 5e-3),  # Triton's fp32 dot is tf32
    (64, 64, 7, 1, 4, 64, jnp.bfloat16, 2e-2),
]


@functools.partial(jax.jit, static_argnums=(0,))
def _value_and_vjp(fn, q, k, v, dout):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(dout))


def _rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def main() -> int:
  dev = jax.devices()[0]
  print(f'device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}')
  failures = 0
  for seed, (h, w, ks, b, heads, d, dtype, tol) in enumerate(CASES):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (b, h * w, heads, d)
    q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    kw = dict(height=h, width=w, kernel_size=ks)
    got = _value_and_vjp(functools.partial(pallas_kernel.na2d_pallas, **kw), q, k, v, dout)
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision('highest'):
      want = _value_and_vjp(functools.partial(reference.na2d_gather, **kw),
                            f32(q), f32(k), f32(v), f32(dout))
    errs = {}
    for name, g, r in zip(('out', 'dq', 'dk', 'dv'), got, want):
      g32 = np.asarray(g.astype(jnp.float32))
      errs[name] = _rel_err(g32, r) if np.isfinite(g32).all() else float('inf')
    ok = max(errs.values()) < tol
    failures += not ok
    print(f"{'ok  ' if ok else 'MISS'} {h}x{w} k{ks} B{b} H{heads} D{d} {jnp.dtype(dtype).name:<8}"
          + ' '.join(f'{n}={e:.1e}' for n, e in errs.items()) + f'  (tol {tol:g})')
  print(f'{len(CASES) - failures} of {len(CASES)} cases within tolerance')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
