"""Runs `python main.py` as a real subprocess for the crash-safety tests (SIGTERM, kill -9).

    proc = MainProcess(tmp_path, config, workdir)        # config: an ml_collections.ConfigDict
    proc.wait_for(lambda: ...)                            # poll the filesystem or the log
    proc.terminate(); assert proc.wait() == lifecycle.EXIT_PREEMPTED

The config travels as JSON read by a two-line config file, so any test config runs as a
user would run it. The child runs JAX on one CPU device, quietly.
"""

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA flags of every test process (conftest.py) and of the processes tests launch. The
# tests' programs are small and run for moments, so compiling them is most of the suite's
# time (1130 of 1960 test-seconds at -O1). LLVM at -O0 without its expensive passes
# compiles ~27% faster than at -O1 (the test sampler: 5.2 against 7.1 s) and the whole
# suite ran in 796 instead of 1015 s (2 cores, -n 2, back to back); -O1 had cut the tiny
# demo's compiles from 60 to 44 s against XLA's default. The numbers differ from -O1's in
# the last bits, the same in every process of a run, which is what the tests compare.
# XLA's older loop emitters (fusion emitters off) compile faster again: the sampler test
# 12 -> 6.6 s, the whole suite 737 -> 596 s (17.9 instead of 22.2 CPU-minutes), though a
# few long-running tests run slower (the classifier fixture 19 -> 27 s). XLA aborts on a
# flag it does not know; jaxlib 0.10.2 and 0.11.2 know these.
TEST_XLA_FLAGS = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
                  '--xla_cpu_use_fusion_emitters=false')
# The crash-safety runs below: main.py trains tens of steps from a compilation cache, so
# there the faster code of -O1 wins (the tokenizer's SIGTERM / kill -9 test took 101 s at
# -O1 against 120 s at -O0). Their runs are compared only with each other.
MAIN_PROCESS_XLA_FLAGS = '--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true'

_CONFIG_PY = '''import json
import ml_collections


def get_config():
  with open({path!r}) as f:
    return ml_collections.ConfigDict(json.load(f))
'''


def write_config(directory, config, name='config') -> str:
  """A config file (configs/*.py style) that returns `config`; returns its path."""
  os.makedirs(directory, exist_ok=True)
  json_path = os.path.join(directory, f'{name}.json')
  with open(json_path, 'w') as f:
    f.write(config.to_json())
  py_path = os.path.join(directory, f'{name}.py')
  with open(py_path, 'w') as f:
    f.write(_CONFIG_PY.format(path=json_path))
  return py_path


class MainProcess:
  """`python main.py --config=<config> --workdir=<workdir>` with its log in a file."""

  def __init__(self, config_path: str, workdir: str, *, log_path: str, cache_dir: str | None = None,
               extra_args=()):
    env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=REPO)
    env['XLA_FLAGS'] = MAIN_PROCESS_XLA_FLAGS  # not the caller's (e.g. a forced device count)
    # Off unless asked for (the CLI's default is a cache in the user's home).
    extra_args = (f"--compilation_cache_dir={cache_dir or 'none'}", *extra_args)
    if cache_dir:  # later runs of one test reuse the executables of the first (same numbers)
      env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    self.log_path = log_path
    self._log = open(log_path, 'w')
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'main.py'), f'--config={config_path}',
         f'--workdir={workdir}', *extra_args],
        cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def wait_for(self, condition, timeout: float = 300.0, what: str = 'condition') -> None:
    """Polls `condition()` every 20 ms; fails if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f'process exited ({self.proc.returncode}) before {what}:\n'
                             + self.log()[-3000:])
      if time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f'timed out waiting for {what}:\n' + self.log()[-3000:])
      time.sleep(0.02)

  def terminate(self) -> None:
    self.proc.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    self.proc.kill()  # SIGKILL: no handler runs, nothing is flushed

  def wait(self, timeout: float = 600.0) -> int:
    try:
      return self.proc.wait(timeout)
    finally:
      self._log.close()


def steps_in(directory: str) -> list[int]:
  """Finished Orbax steps in a checkpoint directory (names that are integers)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
