"""A dense layer's matmul whose weight gradient XLA:CPU computes at its full GEMM rate.

For y = x @ W (x: (..., K), W: (K, N)) the backward's weight gradient is dW = x^T g, a dot
that contracts x's row axis. XLA:CPU hands such a transposed-operand dot to Eigen instead of
its YNNPACK GEMM and runs it at ~60% of the rate: on a 2-core CPU, fp32, (M, 1024)^T @
(M, 4096) ran at 70-88 GFLOP/s against 116-127 for the same product with x transposed
first, and torch's 113-127 (M = 338 and 512, the d16 scale-8 and scale-9 steps at batch 2).
Those products are a quarter of a training step's matmul FLOPs.

`dense_dot_general` is nn.Dense's `lax.dot_general` in the forward; its backward transposes
x into a (K, M) array behind an optimisation barrier (XLA would otherwise fold the transpose
back into the dot) and multiplies in the usual orientation. Same values up to the GEMM's
summation order; one extra copy of x (M x K) per layer. Only layers at least as wide as
their input (N >= K: qkv, proj, fc1, the head) take it: for fc2 (K = 4N) the autodiff dot
ran at full rate and the copied form at 0.81-0.89x (launch/bench_weight_grad_dots.py).
d16 fp32 batch 2 step, off -> on: 0.94x / 0.90x / 0.86x on scales 0..7 / 8 / 9
(launch/results/cpu_2026-11-27_weight_grads.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

def use_transposed_weight_grads(setting: str) -> bool:
  """'auto': on for the CPU backend only, where it was measured (GPU GEMMs take a
  transposed operand at full rate, and the copy would only cost)."""
  if setting == 'auto':
    return jax.default_backend() == 'cpu'
  return setting == 'on'


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, preferred_element_type):
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=preferred_element_type)


def _matmul_fwd(x, w, preferred_element_type):
  return _matmul(x, w, preferred_element_type), (x, w)


def _matmul_bwd(preferred_element_type, residuals, g):
  del preferred_element_type
  x, w = residuals
  f32 = jnp.float32
  dx = lax.dot_general(g.astype(w.dtype), w, (((g.ndim - 1,), (1,)), ((), ())),
                       preferred_element_type=f32)
  x_KM = lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)  # materialised (K, M)
  dw = lax.dot_general(x_KM, g.reshape(-1, g.shape[-1]).astype(x.dtype),
                       (((1,), (0,)), ((), ())), preferred_element_type=f32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """Drop-in for `lax.dot_general` in nn.Dense (`dot_general=`): the dense pattern (lhs's
  last axis against a 2-D rhs's first, no batch axes, default precision) with a weight at
  least as wide as its input through `_matmul`, anything else to `lax.dot_general`."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  if (rhs.ndim == 2 and tuple(lhs_c) == (lhs.ndim - 1,) and tuple(rhs_c) == (0,)
      and not lhs_b and not rhs_b and precision is None and lhs.dtype == rhs.dtype
      and rhs.shape[0] <= rhs.shape[1]):
    return _matmul(lhs, rhs, preferred_element_type)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)
