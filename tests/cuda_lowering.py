"""Our Pallas GPU kernels lowered for CUDA, and compiled for an H100, on a machine without a GPU.

    text = export_for_cuda(fn, *shape_dtype_structs)        # the StableHLO a GPU would compile
    kernels = compile_for_sm90(fn, *shape_dtype_structs, workdir=tmp_path)
    kernels['na2d_fwd'].ptx, kernels['na2d_fwd'].shared   # PTX text; shared memory bytes

`compile_for_sm90` hands each Pallas kernel's Triton IR to the `triton` package, in a child
process (requirements-test.txt; the test skips where it is absent), which compiles it to PTX
and cubin for sm_90 with the kernel's own num_warps and num_stages, as XLA does on an H100: a
kernel that needs more shared memory than an H100 block may have, or IR that Triton or ptxas
rejects, fails here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

# Triton kernels are opaque custom calls with no export-compatibility guarantee; export
# refuses them unless told (both names: the target changed across JAX versions).
TRITON_TARGETS = ('__gpu$xla.gpu.triton', 'triton_kernel_call_ffi')


# The most shared memory one block may have on an H100 (227 KiB, opted in): a kernel that
# asks for more compiles but fails at launch.
H100_SHARED_BYTES = 227 * 1024


def abstract_gpu_mesh(axis_sizes=(), axis_names=()):
  """An abstract mesh of H100s (None where this jax has no abstract devices)."""
  try:
    device = jax.sharding.AbstractDevice(device_kind='NVIDIA H100 80GB HBM3', platform='gpu',
                                         num_cores=132)
    return jax.sharding.AbstractMesh(axis_sizes, axis_names, abstract_device=device,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(axis_sizes))
  except (AttributeError, TypeError):
    return None


def gpu_target():
  """JAX >= 0.11 needs a GPU to pick the Triton target; on a CPU host we name an abstract H100
  (0.10 falls back to sm_90 by itself and accepts the same context)."""
  mesh = abstract_gpu_mesh()
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh)


def triton_calls(text: str) -> list[str]:
  """The lines of an exported module that call a Triton kernel."""
  return [line for line in text.splitlines() if any(f'@{t}(' in line for t in TRITON_TARGETS)]


def export_for_cuda(fn, *args, mesh=None) -> str:
  """StableHLO text of jit(fn)(*args) lowered for CUDA (under `mesh`, else an abstract H100)."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_TARGETS]
  with gpu_target() if mesh is None else jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=('cuda',), disabled_checks=checks)(
        *args).mlir_module()


@dataclasses.dataclass(frozen=True)
class Sm90Kernel:
  """One kernel as Triton compiled it for sm_90."""
  ptx: str
  cubin_bytes: int
  shared: int  # bytes of shared memory per block
  num_warps: int
  num_stages: int


def compile_for_sm90(fn, *args, workdir) -> dict[str, Sm90Kernel]:
  """{kernel name: Sm90Kernel} for every Pallas kernel of jit(fn)(*args), compiled for sm_90
  with the launch settings of its custom call."""
  try:  # (metadata only: conftest keeps triton out of the test processes)
    importlib.metadata.version('triton')
  except importlib.metadata.PackageNotFoundError:
    pytest.skip('the triton package is not installed (requirements-test.txt)')
  # Private hook: the Triton IR exists only inside the lowering (the export carries bytecode).
  from jax._src.pallas.triton import lowering
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  modules, lower = [], lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):
    result = lower(*a, **kw)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(lowering, 'lower_jaxpr_to_triton_module', capture)
    # A new function: a lowering cached by an earlier export of `fn` would skip the hook.
    text = export_for_cuda(lambda *a: fn(*a), *args)
  settings = [re.search(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', c)
              for c in triton_calls(text)]
  assert settings and all(settings), f'no launch settings in the Triton calls of:\n{text[:3000]}'
  assert len(modules) == len(settings), (len(modules), len(settings))
  names = [s.group(1) for s in settings]
  assert len(set(names)) == len(names), f'two kernels share a name (one file each): {names}'
  jobs = []
  for ir, (name, stages, warps) in zip(modules, (s.groups() for s in settings)):
    assert ir.startswith(f'module @{name} '), (name, ir[:200])
    (workdir / f'{name}.ttir').write_text(ir)
    jobs.append(f'{name}:{warps}:{stages}')
  # Triton in a process of its own: it and TensorFlow (which earlier tests of a worker may
  # have imported) both register LLVM's command-line options, and LLVM aborts the process.
  env = dict(os.environ, TRITON_CACHE_DIR=str(workdir / 'triton_cache'))  # not ~/.triton
  res = subprocess.run([sys.executable, __file__, str(workdir), *jobs], env=env,
                       capture_output=True, text=True, timeout=600)
  if res.returncode == _CANNOT_PARSE:  # IR from JAX's bundled Triton that this Triton can't read
    pytest.skip(res.stdout.strip().splitlines()[-1])
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  compiled = {}
  for job in jobs:
    name = job.split(':')[0]
    meta = json.loads((workdir / f'{name}.json').read_text())
    compiled[name] = Sm90Kernel(ptx=(workdir / f'{name}.ptx').read_text(), **meta)
    assert compiled[name].cubin_bytes > 0, f'ptxas produced no cubin for {name}'
    shared = compiled[name].shared
    assert shared <= H100_SHARED_BYTES, f'{name} needs {shared} bytes of shared memory per block'
    print(f'{name}: {shared} bytes of shared memory, {meta["num_warps"]} warps, '
          f'{meta["num_stages"]} stages')
  return compiled


_CANNOT_PARSE = 3


def _compile_main(workdir: str, *jobs: str) -> None:
  """The child: NAME:WARPS:STAGES jobs -> NAME.ptx and NAME.json beside NAME.ttir."""
  import triton
  from triton.backends.compiler import GPUTarget
  for job in jobs:
    name, warps, stages = job.split(':')
    base = os.path.join(workdir, name)
    try:
      kernel = triton.compile(
          base + '.ttir', target=GPUTarget('cuda', 90, 32),
          # enable_fp_fusion: Triton's default (a mul and an add may become one FMA).
          options=dict(num_warps=int(warps), num_stages=int(stages), enable_fp_fusion=True))
    except Exception as e:  # noqa: BLE001
      if 'pars' in str(e).lower():
        print(f"triton {triton.__version__} cannot parse this JAX's Triton IR: {e}")
        sys.exit(_CANNOT_PARSE)
      raise
    with open(base + '.ptx', 'w') as f:
      f.write(kernel.asm['ptx'])
    with open(base + '.json', 'w') as f:
      json.dump({'cubin_bytes': len(kernel.asm.get('cubin') or b''),
                 'shared': int(kernel.metadata.shared),
                 'num_warps': int(kernel.metadata.num_warps),
                 'num_stages': int(kernel.metadata.num_stages)}, f)


if __name__ == '__main__':
  _compile_main(*sys.argv[1:])
