"""Device mesh, logical-axis sharding rules and multi-host start-up.

    initialize_distributed()                      # once, before anything touches devices
    mesh = create_mesh(config.mesh)               # axes ('data', 'fsdp')
    rules = logical_rules(config.mesh)            # (('embed', 'fsdp'), ('mlp', None), ...)
    abstract = jax.eval_shape(init_fn, rng)       # boxed (nn.Partitioned) shapes, no memory
    shardings = logical_shardings(abstract, mesh, rules)
    params = jax.jit(init_fn, out_shardings=shardings)(rng)   # born sharded

Two mesh axes: 'data' replicates parameters and splits the batch; 'fsdp' splits
the batch too and additionally shards parameters (and optimizer state) along
their 'embed' axis, ZeRO-3 style: each device keeps 1/fsdp of the weights and
XLA all-gathers them per layer. The batch is split over both axes.

The rules table is the one place that maps the model's logical names (see
transformer.py: 'embed', 'mlp', 'qkv', 'adaln', 'vocab', 'heads', 'cvae',
'classes', 'levels', 'tokens') and the activations' ('activation_batch') to mesh
axes.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')

# Logical axis -> mesh axes. Only 'embed' (present in every large weight) is
# sharded; the other weight axes stay whole, so every matmul needs at most one
# all-gather of its weight and no reduce-scatter over a contraction axis.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('activation_batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', None),
    ('qkv', None),
    ('adaln', None),
    ('vocab', None),
    ('heads', None),
    ('cvae', None),
    ('classes', None),
    ('levels', None),
    ('tokens', None),
)


# ----------------------------------------------------------------------------- multi-host

def initialize_distributed() -> str:
  """Starts the JAX multi-process runtime when the job spans several processes.

  Returns how it was started ('env', 'slurm', 'tpu', or 'single' for the no-op):
  - env-var GPU clusters: COORDINATOR_ADDRESS (host:port), NUM_PROCESSES, PROCESS_ID
    and optionally LOCAL_DEVICE_IDS ('0,1,2,3');
  - SLURM (srun with more than one task): JAX reads SLURM_* itself;
  - TPU pods (several hosts in TPU_WORKER_HOSTNAMES, or MEGASCALE multi-slice):
    JAX asks the TPU metadata itself;
  - otherwise nothing: one process sees all local devices.
  Must run before the first JAX computation. Calling it twice is harmless.
  """
  if jax.distributed.is_initialized():
    return 'already'
  env = os.environ
  if env.get('COORDINATOR_ADDRESS'):
    missing = [k for k in ('NUM_PROCESSES', 'PROCESS_ID') if not env.get(k)]
    if missing:
      raise ValueError(f'COORDINATOR_ADDRESS is set, so {missing} must be set too '
                       '(env-var cluster start-up)')
    local = env.get('LOCAL_DEVICE_IDS')
    jax.distributed.initialize(
        coordinator_address=env['COORDINATOR_ADDRESS'],
        num_processes=int(env['NUM_PROCESSES']), process_id=int(env['PROCESS_ID']),
        local_device_ids=[int(i) for i in local.split(',')] if local else None)
    return 'env'
  if int(env.get('SLURM_NTASKS', env.get('SLURM_NPROCS', '1'))) > 1 and env.get('SLURM_JOB_ID'):
    jax.distributed.initialize(cluster_detection_method='slurm')
    return 'slurm'
  tpu_hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(tpu_hosts) > 1 or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()  # autodetects GCE / GKE TPU metadata
    return 'tpu'
  return 'single'


# ----------------------------------------------------------------------------- mesh

def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes; at most one of them may be -1 ('all the remaining devices')."""
  sizes = {}
  for axis in MESH_AXES:
    if axis not in mesh_config:
      raise ValueError(f'mesh.{axis} is missing (give a size, or -1 for the rest)')
    size = int(mesh_config[axis])
    if size == 0 or size < -1:
      raise ValueError(f'mesh.{axis} must be a positive size or -1 (the rest), got {size}')
    sizes[axis] = size
  rest = [a for a in MESH_AXES if sizes[a] == -1]
  if len(rest) > 1:
    raise ValueError(f'only one of mesh.data, mesh.fsdp may be -1, got {sizes}')
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if rest:
    if num_devices % fixed:
      raise ValueError(f'mesh.{rest[0]}=-1 needs the device count ({num_devices}) to be a '
                       f'multiple of the fixed axes ({fixed}), got {sizes}')
    sizes[rest[0]] = num_devices // fixed
  if sizes['data'] * sizes['fsdp'] != num_devices:
    raise ValueError(f'mesh.data * mesh.fsdp must equal the device count ({num_devices}), '
                     f'got {sizes["data"]} * {sizes["fsdp"]}')
  return sizes['data'], sizes['fsdp']


def mesh_devices(mesh_config: Mapping[str, Any]) -> list[jax.Device]:
  """All devices, or the first mesh_config.num_devices of them (single-process debugging)."""
  devices = jax.devices()
  n = int(mesh_config.get('num_devices', -1) or -1)
  if n == -1:
    return devices
  if not 1 <= n <= len(devices):
    raise ValueError(f'mesh.num_devices must be -1 (all) or in [1, {len(devices)}], got {n}')
  if n != len(devices) and jax.process_count() > 1:
    raise ValueError(f'mesh.num_devices must be -1 (all devices) on {jax.process_count()} '
                     f'processes, got {n}')
  return devices[:n]


def create_mesh(mesh_config: Mapping[str, Any],
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes ('data', 'fsdp'); fsdp is the inner (fastest, intra-host) axis."""
  devices = list(mesh_devices(mesh_config) if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:  # topology-aware order (ICI / NVLink neighbours on the inner axis)
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # simulated CPU devices, odd shapes: plain order is fine
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_rules(mesh_config: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
  """The rules from `mesh_config.rules` (a sequence of (logical, mesh axes)) or the defaults."""
  rules = None if mesh_config is None else mesh_config.get('rules')
  if not rules:
    return DEFAULT_RULES
  out = []
  for pair in rules:
    if len(pair) != 2:
      raise ValueError(f'mesh.rules entries must be (logical_name, mesh_axes) pairs, got {pair!r}')
    name, axes = pair
    for a in (axes if isinstance(axes, (tuple, list)) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f'mesh.rules maps {name!r} to {a!r}; mesh axes are {MESH_AXES}')
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


# ----------------------------------------------------------------------------- shardings

def _fits(shape: Sequence[int], spec: P, mesh: Mesh) -> bool:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
    if dim % size:
      return False
  return True


def logical_shardings(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of a tree of boxed (nn.Partitioned) shapes.

  Unboxed leaves and leaves whose sharded dimension does not divide by the mesh
  axis size (e.g. a width not divisible by fsdp) are replicated, with a log line,
  rather than failing: correctness never depends on the layout.
  """

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      shape = leaf.value.shape
    elif isinstance(leaf, nn.Partitioned):
      spec, shape = P(*leaf.names), leaf.value.shape
    else:
      return NamedSharding(mesh, P())
    if not _fits(shape, spec, mesh):
      logging.info('replicating a %s leaf: spec %s does not divide it on mesh %s',
                   shape, spec, dict(mesh.shape))
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map(one, abstract_tree,
                                is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a batch's leading axis ('activation_batch'); other axes whole."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(('activation_batch',), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """Number of batch shards: the global batch must be a multiple of it."""
  spec = nn.logical_to_mesh_axes(('activation_batch',), rules)[0]
  if spec is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in (spec if isinstance(spec, tuple) else (spec,))]))


def traced_on_mesh(fn, mesh: Mesh, rules=DEFAULT_RULES):
  """fn, traced with `mesh` as the ambient mesh and `rules` as flax's logical-axis rules.

  Then the model's activation constraints (`nn.with_logical_constraint`) take effect, and the
  Pallas kernels run once per device on its rows of the batch (`kernels.per_shard`); without
  a mesh XLA would gather the global batch onto every device for them, as it cannot split a
  custom call.
  """

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)
  return wrapped


def to_global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Host-local numpy arrays (this process's rows) -> global jax.Arrays on `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
