"""Test set-up: JAX on CPU with 8 simulated devices, fast-compiling XLA flags, TensorFlow kept off any GPU."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Hermetic tests: no executables from earlier runs (tests that exercise the cache set their own).
os.environ.setdefault('MVAR_COMPILATION_CACHE_DIR', 'none')

from main_process import TEST_XLA_FLAGS  # noqa: E402  (this directory is on sys.path)

# Before JAX starts; inherited by the processes tests launch. Why: see TEST_XLA_FLAGS.
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import sys  # noqa: E402

# torch imports triton where it is installed (dynamo, flex attention), and in a process that
# has loaded TensorFlow LLVM then aborts: both register its command-line options. No test
# process needs triton itself (tests/cuda_lowering.py runs it in a child process), so here
# `import triton` fails and torch takes its paths without it.
sys.modules.setdefault('triton', None)

import jax  # noqa: E402

# Must run before the first JAX computation: sharding tests build an 8-device mesh on CPU.
jax.config.update('jax_num_cpu_devices', 8)


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_demo_run(tmp_path_factory):
  """(workdir, report) of the cheapest demo that runs every stage, shared by the demo and
  notebook tests (training it is most of their time)."""
  from test_demo import tiny_demo_config
  from mvar_jax import demo
  workdir = str(tmp_path_factory.mktemp('tiny_demo') / 'demo')
  return workdir, demo.run(tiny_demo_config(), workdir)


# Test files that share a session fixture run on the same xdist worker (`-n 2 --dist loadfile`,
# the README's command): the tiny demo run is trained once for the demo and notebook tests.
_SAME_WORKER_AS = {'tests/test_notebook.py': 'tests/test_demo.py'}
# Files whose few tests take minutes (end-to-end runs, kill -9 and resume), handed out first:
# xdist orders files by test count, so these started last and one worker ran them alone for
# the last ~2 minutes while the other idled (clean-clone CI at 903-911 s of its 900).
_HEAVY_FIRST = ('tests/test_train_tokenizer.py', 'tests/test_train.py',
                'tests/test_multiprocess.py', 'tests/test_demo.py', 'tests/test_sample_mode.py')


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getoption('dist') != 'loadfile':
    return None
  from xdist.scheduler import LoadFileScheduling

  class SharedFixtureFileScheduling(LoadFileScheduling):

    def _split_scope(self, nodeid):
      scope = super()._split_scope(nodeid)
      return _SAME_WORKER_AS.get(scope, scope)

    def _assign_work_unit(self, node):
      for scope in reversed(_HEAVY_FIRST):
        if scope in self.workqueue:
          self.workqueue.move_to_end(scope, last=False)
      super()._assign_work_unit(node)

  return SharedFixtureFileScheduling(config, log)
