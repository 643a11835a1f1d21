"""Runs an opaque kernel once per shard of the batch under the ambient mesh.

    out = over_batch(kernel_fn, q_B..., k_B..., v_B...)   # arrays share their leading axis
    out = over_batch(kernel_fn, x_B..., shared=(weight, bias))   # whole on every device

XLA's SPMD partitioner cannot split a custom call such as a Pallas kernel: under `jax.jit`
with batch-sharded operands it gathers them and runs the whole global batch on every
device (jax-ml/jax-triton#163), so a kernel that wins on one GPU loses on eight. Inside
`jax.shard_map` the kernel sees only its device's rows. The mesh is the ambient one
(`jax.set_mesh` or `jax.sharding.use_abstract_mesh`, as the trainer sets around its steps);
with none, or a batch no mesh axis divides, the kernel is called as it is.

The batch is split over the mesh axes that flax's logical-axis rules in context give
'activation_batch' (the trainer sets them: ('data', 'fsdp')), or with no rules over all the
mesh's non-manual axes, in order, as long as their product divides it. Every array argument
is split along its leading axis; results come back split the same way. `shared` operands
(weights, biases, per-head scales) reach every device whole, after `arrays`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P


def _rule_axes() -> tuple[str, ...] | None:
  """The mesh axes flax's logical-axis rules in context give 'activation_batch' (None: no
  rule)."""
  for name, axes in nn.get_logical_axis_rules():
    if name == 'activation_batch':
      return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return None


def batch_axes(mesh, batch_size: int) -> tuple[str, ...]:
  """Mesh axes (the batch's by the rules in context, else all; size > 1, not manual) that
  split `batch_size` rows: a prefix whose product divides it."""
  if mesh.empty:
    return ()
  manual = getattr(jax.sharding.AxisType, 'Manual', None)
  wanted = _rule_axes()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  kinds = dict(zip(mesh.axis_names, mesh.axis_types))
  axes, size = [], 1
  for name in mesh.axis_names if wanted is None else wanted:
    n, kind = sizes.get(name, 1), kinds.get(name)
    if n == 1 or kind == manual:
      continue
    if batch_size % (size * n):
      break
    axes.append(name)
    size *= n
  return tuple(axes)


def over_batch(fn: Callable, *arrays, shared: tuple = ()):
  """fn(*arrays, *shared), each device running it on its rows of every array's leading axis
  and on the whole of each `shared` operand (gathered first if it is sharded)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = batch_axes(mesh, arrays[0].shape[0])
  if not axes:
    return fn(*arrays, *shared)
  spec = P(axes)
  # check_vma off: pallas_call has no rule for varying manual axes; every batch operand and
  # result is split on the same axes and the shared ones on none: nothing to check.
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays) + (P(),) * len(shared),
                       out_specs=spec, check_vma=False)(*arrays, *shared)
