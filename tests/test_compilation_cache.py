"""The persistent compilation cache: where it points, and that a second process reuses it."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from mvar_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_jax_cache_dir():
  before = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update('jax_compilation_cache_dir', before)


class TestResolveDirectory:

  def test_argument_beats_the_environment(self, monkeypatch, tmp_path):
    monkeypatch.setenv(compilation_cache.ENV_VAR, str(tmp_path / 'env'))
    assert compilation_cache.resolve_directory(str(tmp_path / 'arg')) == str(tmp_path / 'arg')

  def test_environment_beats_jax_config_and_default(self, monkeypatch, tmp_path,
                                                     restore_jax_cache_dir):
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'jax'))
    monkeypatch.setenv(compilation_cache.ENV_VAR, str(tmp_path / 'env'))
    assert compilation_cache.resolve_directory() == str(tmp_path / 'env')

  def test_a_directory_given_to_jax_is_kept(self, monkeypatch, tmp_path, restore_jax_cache_dir):
    monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'jax'))
    assert compilation_cache.resolve_directory() == str(tmp_path / 'jax')

  def test_default_directory(self, monkeypatch, restore_jax_cache_dir):
    monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
    jax.config.update('jax_compilation_cache_dir', None)
    assert compilation_cache.resolve_directory() == compilation_cache.DEFAULT_DIR

  @pytest.mark.parametrize('off', ['none', 'None', ''])
  def test_none_turns_it_off(self, monkeypatch, off):
    monkeypatch.setenv(compilation_cache.ENV_VAR, off)
    assert compilation_cache.resolve_directory() is None
    assert compilation_cache.enable() is None
    assert compilation_cache.resolve_directory('none') is None

  def test_off_also_turns_off_a_cache_jax_was_given(self, tmp_path, restore_jax_cache_dir):
    """--compilation_cache_dir=none with $JAX_COMPILATION_CACHE_DIR set: nothing is written."""
    jax.config.update('jax_compilation_cache_dir', str(tmp_path))
    assert compilation_cache.enable('none') is None
    assert not jax.config.jax_compilation_cache_dir
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    try:
      jax.jit(lambda x: x * 3 + 1).lower(1.0).compile()
    finally:
      jax.config.update('jax_persistent_cache_min_compile_time_secs', before)
    assert os.listdir(tmp_path) == []


_SAMPLE_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    traced = []  # the sampler traced in this process (its executable did not come from disk)
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, fun_name='', **kw: traced.append(fun_name)
        if name == '/jax/core/compile/jaxpr_trace_duration' and 'scale_loop' in fun_name else None)
    from mvar_jax import api, sampling, transformer, vqvae
    from mvar_jax.attention import AttentionConfig
    if len(sys.argv) > 1:  # the CPU sampler's split point, in rows (scale 1 here: 2 x 2 x 4)
      sampling._CPU_DOT_MIN_ROWS = int(sys.argv[1])
    pn = (1, 2, 3, 4)
    v_cfg = vqvae.VQVAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, vocab_size=16,
                              patch_nums=pn, using_sa=False, using_mid_sa=False, norm_groups=8)
    t_cfg = transformer.TransformerConfig(depth=1, width=16, num_heads=1, vocab_size=16, cvae=4,
                                          num_classes=3, patch_nums=pn,
                                          attention=AttentionConfig(refine_step=3, kernel_size=3))
    shapes_v = jax.eval_shape(lambda: vqvae.init_params(v_cfg, jax.random.key(0)))['params']
    shapes_t = jax.eval_shape(lambda: transformer.init_params(t_cfg, jax.random.key(0)))['params']
    import flax.linen as nn
    rng = np.random.default_rng(0)
    fill = lambda t: jax.tree_util.tree_map(
        lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), nn.unbox(t))
    pipe = api.MVARPipeline(v_cfg, fill(shapes_v), t_cfg, fill(shapes_t))
    key = jax.random.key(3)
    del traced[:]
    out = pipe.sample(key, labels=[0, 2], cfg=1.5, top_k=5, top_p=0.9)
    print(json.dumps({'traced': len(traced), 'ids': [np.asarray(i).tolist() for i in out.ids]}))
''')


def _run(cache_dir, *args):
  env = dict(os.environ, MVAR_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PLATFORMS='cpu',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, '-c', _SAMPLE_SCRIPT, *args], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_sampler_from_the_cache(tmp_path):
  """The API turns the cache on by itself; the second process neither traces nor compiles it."""
  first = _run(tmp_path / 'xla')
  assert first['traced'] >= 1
  stored = os.listdir(tmp_path / 'xla' / compilation_cache.EXECUTABLES_SUBDIR)
  assert len(stored) == 1  # the whole sampler executable
  second = _run(tmp_path / 'xla')
  assert second['traced'] == 0
  assert second['ids'] == first['ids']  # same key, same samples, across processes
  # A damaged file is not fatal: the third process gets the program again and removes it.
  # The program comes from JAX's own cache there, and such an executable re-serialises
  # without its kernels on XLA:CPU, so it is not stored: it was, and the fourth process
  # failed ("Function ... not found"). Any change of our key that leaves the program as it
  # was (an edited source file, a config field the program ignores) took the same path.
  path = tmp_path / 'xla' / compilation_cache.EXECUTABLES_SUBDIR / stored[0]
  path.write_bytes(path.read_bytes()[:1000])
  third = _run(tmp_path / 'xla')
  assert third['traced'] >= 1 and third['ids'] == first['ids']
  assert _run(tmp_path / 'xla')['ids'] == first['ids']
  assert not path.exists()


def test_a_second_process_loads_both_programs_of_a_split_sampler_without_tracing(tmp_path):
  """The CPU sampler's default split (`sampling.cpu_split`): the second program's input
  shapes come from the first's stored executable, not from tracing it again."""
  first = _run(tmp_path / 'xla', '16')
  assert first['traced'] >= 2
  assert len(os.listdir(tmp_path / 'xla' / compilation_cache.EXECUTABLES_SUBDIR)) == 2
  second = _run(tmp_path / 'xla', '16')
  assert second['traced'] == 0
  assert second['ids'] == first['ids']

