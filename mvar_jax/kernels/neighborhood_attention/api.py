"""Entry point for 2D neighbourhood attention: one function, several implementations.

  out_BNHD = neighborhood_attention(q, k, v, height=16, width=16, kernel_size=7, scale=1.0)

implementation:
  'gather'  pure-JAX gathered windows (reference)
  'dense'   dense attention under a neighbourhood mask (XLA)
  'blocked' query row blocks x their key-row band, dense matmuls under the window mask
            (pure JAX; default on CPU and TPU)
  'pallas'  fused Pallas GPU kernel (forward and backward; interpret=True runs it on CPU)
  'auto'    on GPU: GPU_DEFAULT (see below); elsewhere 'blocked'

On GPU 'auto' is the Pallas kernel: on an H100 it beat every dense alternative at 16x16 and
32x32 (3.2x cuDNN's masked attention at 32x32, forward and backward; see
launch/results/h100_2026-11-25.md). Unsupported head dims or dtypes fall back to 'dense'.
"""

from __future__ import annotations

import jax

from mvar_jax.kernels.neighborhood_attention import reference

IMPLEMENTATIONS = ('auto', 'gather', 'dense', 'blocked', 'pallas')
GPU_DEFAULT = 'pallas'  # what 'auto' picks on GPU (measured: launch/results/h100_2026-11-25.md)


def resolve_implementation(implementation: str | None) -> str:
  """Maps 'auto'/None to a concrete implementation for the default backend."""
  implementation = implementation or 'auto'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}')
  if implementation == 'auto':
    if jax.default_backend() != 'gpu':
      return 'blocked'  # fastest and smallest on CPU (launch/bench_neighborhood_attention.py)
    if GPU_DEFAULT == 'pallas' and not _pallas_available():
      return 'dense'
    return GPU_DEFAULT
  return implementation


def _pallas_available() -> bool:
  try:
    from mvar_jax.kernels.neighborhood_attention import pallas_kernel  # noqa: F401
  except ImportError:
    return False
  return True


def neighborhood_attention(q_BNHD, k_BNHD, v_BNHD, *, height: int, width: int,
                           kernel_size: int, scale: float | None = None,
                           implementation: str | None = 'auto', block_sizes=None,
                           interpret: bool | None = None):
  """2D neighbourhood attention over raster-ordered maps; returns (B, N, heads, D).

  block_sizes (`pallas_kernel.BlockSizes`) and interpret only affect the 'pallas' kernel.
  """
  reference.validate(height, width, kernel_size)
  impl = resolve_implementation(implementation)
  if impl == 'pallas' and implementation in (None, 'auto'):
    from mvar_jax.kernels.neighborhood_attention import pallas_kernel
    if not pallas_kernel.supports(q_BNHD.shape[-1], q_BNHD.dtype):
      impl = 'dense'  # e.g. head dim 48: 'auto' must not fail where the reference works
  kwargs = dict(height=height, width=width, kernel_size=kernel_size, scale=scale)
  if impl == 'gather':
    return reference.na2d_gather(q_BNHD, k_BNHD, v_BNHD, **kwargs)
  if impl == 'dense':
    return reference.na2d_dense(q_BNHD, k_BNHD, v_BNHD, **kwargs)
  if impl == 'blocked':
    from mvar_jax.kernels.neighborhood_attention import blocked
    return blocked.na2d_blocked(q_BNHD, k_BNHD, v_BNHD, **kwargs)
  from mvar_jax.kernels.neighborhood_attention import pallas_kernel
  return pallas_kernel.na2d_pallas(q_BNHD, k_BNHD, v_BNHD, block_sizes=block_sizes,
                                   interpret=interpret, **kwargs)
