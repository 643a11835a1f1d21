"""The benchmark scripts in launch/: the pieces that need neither a GPU nor the official code."""

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  sys.path.insert(0, os.path.join(ROOT, 'launch'))
  try:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'launch', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(os.path.join(ROOT, 'launch'))


def _fake_checkout(path, tag):
  """A checkout shaped like the official ones: top-level `models` and `utils` packages."""
  (path / 'models').mkdir(parents=True)
  (path / 'utils').mkdir()
  (path / 'utils' / '__init__.py').write_text(f'TAG = {tag!r}\n')
  (path / 'models' / '__init__.py').write_text(
      'from utils import TAG\n'
      'def build():\n'
      '  from utils import TAG as late  # resolved when called, as the official builders do\n'
      '  return TAG, late\n')
  return str(path)


def test_two_checkouts_with_the_same_package_names_import_side_by_side(tmp_path):
  bench = _load('bench_vs_official')
  before = {k for k in sys.modules if k.split('.')[0] in ('models', 'utils')}
  mvar = bench.import_official(_fake_checkout(tmp_path / 'MVAR', 'mvar'))
  var = bench.import_official(_fake_checkout(tmp_path / 'VAR', 'var'))
  assert mvar.TAG == 'mvar' and var.TAG == 'var'
  assert {k for k in sys.modules if k.split('.')[0] in ('models', 'utils')} == before
  with pytest.raises(SystemExit, match='has no models/ package'):
    bench.import_official(str(tmp_path))


def test_a_contender_that_fails_is_dropped_and_the_others_are_timed(capsys):
  # On an H100 our VAR-mode training step at batch 32 ran out of device memory after the
  # MVAR segments had been timed; the run then ended with no table at all.
  bench = _load('bench_vs_official')
  calls = []

  def ok():
    calls.append('ok')

  def out_of_memory():
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 37.89GiB\nmore')

  def fails_later():
    if len(calls) > 2:
      raise RuntimeError('late')
    calls.append('later')

  failed = {}
  results = bench.time_interleaved(
      [bench.Contender('a', 'train', ok, 'jax'), bench.Contender('b', 'train', out_of_memory, 'jax'),
       bench.Contender('c', 'train', fails_later, 'jax')], reps=3, warmup=1, failed=failed)
  assert list(results) == ['a'] and len(results['a'][1]) == 3
  assert failed == {'b': 'RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to '
                         'allocate 37.89GiB', 'c': 'RuntimeError: late'}
  assert '# b failed, dropped' in capsys.readouterr().out


def test_streamed_timings_queue_the_calls_and_wait_once_per_timing():
  bench = _load('bench_vs_official')
  log = []

  def queued():
    raise AssertionError('the streamed timing must not use the synchronised call')

  queued.stream = lambda n: log.append(('queued', n))
  timings = bench.time_streams(
      [bench.Contender('q', 'sample', queued, 'jax'),
       bench.Contender('no stream', 'sample', lambda: None, 'torch')], calls=4, reps=2)
  assert log == [('queued', 4)] * 2
  assert list(timings) == ['q'] and len(timings['q']) == 2
  assert all(t >= 0 for t in timings['q'])


def test_each_of_our_rows_is_compared_with_its_official_twin():
  bench = _load('bench_vs_official')
  assert bench.official_twin('ours MVAR') == 'official MVAR'
  assert bench.official_twin('ours VAR mode') == 'official VAR'
  assert bench.official_twin('ours MVAR train scale 8') == 'official MVAR train scale 8'
  assert bench.official_twin('ours VAR mode train scales 0..9') == 'official VAR train scales 0..9'
  assert bench.official_twin('ours MVAR (unfused qkv)') == 'official MVAR'
  med = lambda v: sorted(v)[len(v) // 2]
  rows = {'official MVAR': [2.0], 'official VAR': [4.0], 'ours MVAR': [1.0],
          'ours MVAR train scale 8': [3.0]}
  assert bench.ratio_to_official('ours MVAR', rows, med) == '0.50x'
  assert bench.ratio_to_official('official MVAR', rows, med) == ''
  assert bench.ratio_to_official('ours MVAR train scale 8', rows, med) == ''  # no twin row
  del rows['official MVAR']  # only the official VAR sampler ran: compared with it, and said so
  assert bench.ratio_to_official('ours MVAR', rows, med) == '0.25x VAR'


def test_the_probes_see_both_programs_of_a_split_sampler():
  bench = _load('bench_vs_official')

  class Program:
    def __init__(self, flops, text):
      self.flops, self.text = flops, text

    def cost_analysis(self):
      return [{'flops': self.flops}]

    def as_text(self):
      return self.text

  class Sampler:
    programs = (Program(2.0, 'HloModule head'), Program(3.0, 'HloModule tail'))

    def memory_analysis(self):
      return 'the larger one'

  probes = bench._Programs(Sampler())
  assert probes.cost_analysis() == {'flops': 5.0}
  assert probes.as_text() == 'HloModule head\nHloModule tail'
  assert probes.memory_analysis() == 'the larger one'
  assert bench.VARIANTS['ours MVAR (Triton GEMM before scale 7)']['split_at_scale'] == 7


def test_the_official_vqvae_is_filled_deterministically():
  bench = _load('bench_vs_official')
  vae = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8),
                            torch.nn.Embedding(16, 4))
  for p in vae.parameters():
    torch.nn.init.constant_(p, float('nan'))  # what torch.empty may hold
  bench.fill_vqvae_(vae, seed=3)
  first = [p.clone() for p in vae.parameters()]
  assert all(torch.isfinite(p).all() for p in first)
  assert torch.all(vae[1].weight == 1) and torch.all(vae[0].bias == 0)
  assert vae[2].weight.abs().max() <= 1 / 16
  bench.fill_vqvae_(vae, seed=3)
  assert all(torch.equal(a, b) for a, b in zip(first, vae.parameters()))


def test_collective_bytes_read_the_partitioned_hlo():
  bench = _load('bench_comms')
  hlo = '\n'.join([
      '  %ag = f32[8,1024]{1,0} all-gather(f32[1,1024]{1,0} %p), replica_groups=[1,8]<=[8], dimensions={0}',
      '  %ar = (f32[100]{0}, bf16[50]{0}) all-reduce(%a, %b), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add',
      '  %rs = f32[16]{0} reduce-scatter(f32[64]{0} %g), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add',
      '  %one = f32[10]{0} all-reduce(%c), replica_groups={{0},{1}}, to_apply=%add',
      '  %cp = s32[4]{0} collective-permute(%d), source_target_pairs={{0,1},{1,0}}'])
  sent = bench.collective_bytes(hlo, num_devices=8)
  assert sent['all-gather'] == 8 * 1024 * 4 * 7 / 8
  assert sent['all-reduce'] == 2 * (400 + 100) * 1 / 2  # groups of 2; the 1-device one moves nothing
  assert sent['reduce-scatter'] == 16 * 4 * 3
  assert sent['collective-permute'] == 16


def test_fsdp_step_moves_weights_not_activations(capsys):
  """`bench_comms.py --smoke`: at 8-way FSDP with activations much larger than the weights,
  the scales-0..3 step sends about what gathering the weights and reducing the gradients
  takes (no activation all-reduces: the residual stream stays split over the batch)."""
  bench = _load('bench_comms')
  (row,) = bench.main(['--smoke'])
  out = capsys.readouterr().out
  assert 'partitioned for cpu' in out and 'total MB' in out and '\nd2       1x8     0..3' in out
  # Weights gathered (at most twice, fp32) and gradients all-reduced: (2 + 2) * 7/8 of them.
  assert sum(row.sent.values()) < 3.5 * bench.param_bytes(bench.parse_args(['--smoke']), 2)
  assert row.sent.get('all-gather', 0) > 0  # FSDP gathers the weights


def test_bench_memory_smoke_prints_the_table(capsys):
  bench = _load('bench_memory')
  bench.main(['--smoke', '--skip_parts'])
  out = capsys.readouterr().out
  assert 'MVAR-d1' in out and 'VAR-d1' in out and 'VAR / MVAR sampling peak' in out


def test_bench_memory_measures_the_trainers_step_in_micro_batches():
  """The trainer's own step per segment; 4 micro-batches need less temporary memory."""
  bench = _load('bench_memory')
  args = bench.parse_args(['--smoke', '--batch=32'])
  whole, parts = (dict(bench.trainer_step_mem(args, 1, k)) for k in (1, 4))
  assert list(whole) == ['0..3', '4'] == list(parts)  # the smoke pyramid's segments
  for name in whole:
    assert parts[name].args == whole[name].args
    assert parts[name].temp < whole[name].temp, name


def test_gemm_epilogue_check_compiles_and_times_every_form(capsys):
  check = _load('check_gemm_epilogues')
  rows = check.main(['--smoke'])
  assert [r[0] for r in rows] == list(check.forms(8, 8, 'bfloat16'))
  assert all(r[1] == 'default' and r[3] >= 1 and r[4] > 0 for r in rows)
  assert all(r[2] == '-' for r in rows)  # CPU: no cuBLAS epilogues to find
  hlo = 'x = custom-call(a), backend_config={"epilogue":"BIAS_GELU"} "epilogue":"DEFAULT"'
  assert check.epilogues(hlo) == 'BIAS_GELU,DEFAULT'
  assert 'qkv + one (3C,) bias argument' in capsys.readouterr().out


def test_bench_fusions_smoke_checks_each_candidate_against_the_current_code(capsys):
  bench = _load('bench_fusions')
  bench.main(['--smoke', '--parts=select,addln,gelu', '--reps=1', '--inner=1'])
  rows = [r for r in capsys.readouterr().out.splitlines()
          if r.startswith(('select', 'addln', 'gelu'))]
  # The current code, then each candidate: 5 selections, 4 add+LN tiles; fc1+GELU at 2
  # scales, XLA and 5 fused tiles each, then the totals of XLA and each tile.
  tiles = len(bench.FC1_TILES)
  assert len(rows) == 1 + 5 + 1 + 4 + 2 * (1 + tiles) + 1 + tiles, rows
  assert all('failed' not in r for r in rows)
  assert all(' 0 rows differ' in r for r in rows[1:6])
  diffs = [float(r.split('max diff ')[1]) for r in rows if 'max diff' in r]
  assert len(diffs) == 4 + 2 * tiles and max(diffs) < 0.1  # bf16 rounding
  assert sum('all scales' in r for r in rows) == 1 + tiles
  assert bench.parse_options('a=true,b=2;c=x;') == [{'a': True, 'b': 2}, {'c': 'x'}]


def test_trace_summary_splits_scales_at_each_selection_kernel(tmp_path, capsys):
  """A scale ends with its top-k/top-p selection: XLA's sort or our Pallas kernel."""
  import gzip
  import json
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
            {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}}]
  kernels = [('nvjet_sm90_gemm', 10), ('loop_add_fusion', 2), ('sort_29_1', 5),  # scale 0
             ('nvjet_sm90_gemm', 20), ('na2d_fwd', 4), ('kept_threshold__1', 1),  # scale 1
             ('sm90_xmma_fprop_implicit_gemm', 30), ('input_reduce_fusion', 6)]  # decode
  t = 0
  for name, dur in kernels:
    events.append({'ph': 'X', 'pid': 1, 'tid': 1, 'ts': t, 'dur': dur, 'name': name, 'args': {}})
    t += dur
  events.append({'ph': 'X', 'pid': 2, 'tid': 1, 'ts': 0, 'dur': 999, 'name': 'host', 'args': {}})
  path = tmp_path / 't.trace.json.gz'
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  summary = _load('trace_summary')
  phases = summary.phases(summary.device_kernels(str(path)))
  assert [name for name, _ in phases] == ['scale 0', 'scale 1', 'decode']
  assert [summary.busy_ms(k) * 1e3 for _, k in phases] == [17, 25, 36]
  assert [summary.kernel_group(e['name']) for e in phases[1][1]] == ['matmul', 'na2d', 'select']
  summary.main([str(path)])
  assert '| decode | 0.04 | 0.04 | 0.00 | 0.03 |' in capsys.readouterr().out


def test_trace_summary_sorts_idle_gaps_by_what_borders_them():
  """Waiting for the host after the argument copies, the libraries' memsets, the rest."""
  summary = _load('trace_summary')
  events, t = [], 0.0
  for name, gap, dur in [('MemcpyH2D', 0, 1), ('loop_fusion', 500, 2), ('Memset 0', 3, 1),
                         ('nvjet_sm90_gemm', 4, 10), ('loop_add_fusion', 1, 2),
                         ('sm90_xmma_fprop', 0, 5), ('input_reduce_fusion', 2, 1)]:
    t += gap
    events.append({'ts': t, 'dur': dur, 'name': name})
    t += dur
  assert summary.gaps(events) == {'after a host-to-device copy': (1, 0.5),
                                  'around a memset': (2, 0.007),
                                  'between kernels': (2, 0.003)}


def test_trace_summary_names_each_fusion_from_the_optimised_hlo(tmp_path, capsys):
  """XLA shares one kernel between identical fusions and names it after one of them."""
  import gzip
  import json
  meta = ('metadata={{op_name="jit(_scale_loop)/while/body/eval_jaxpr/MVARTransformer/'
          'blocks_{b}/ffn/mul" deduplicated_name="loop_multiply_fusion.113"}}')
  hlo = '\n'.join([
      'HloModule jit__scale_loop',
      '  %loop_multiply_fusion.128 = bf16[64,256,4096]{2,1,0} fusion(%p.1), kind=kLoop, '
      'calls=%fused_multiply.128, ' + meta.format(b=0),
      '  %loop_multiply_fusion.113 = bf16[64,256,4096]{2,1,0} fusion(%p.2), kind=kLoop, '
      'calls=%fused_multiply.113, ' + meta.format(b=15),
      '  %bitcast.1 = bf16[16384,4096]{1,0} bitcast(%loop_multiply_fusion.128)',
      '  ROOT %input_reduce_fusion.26 = (f32[8,256,160]{2,1,0}, f32[8,256,160]{2,1,0}) '
      'fusion(%x), kind=kInput, metadata={op_name="jit(fhat_to_img)/VQVAE.fhat_to_img/'
      'VQVAE.decode/decoder/up_0/block_0/norm2/reduce_sum"}'])
  with gzip.open(tmp_path / 'ours.hlo.txt.gz', 'wt') as f:
    f.write(hlo)
  summary = _load('trace_summary')
  sources = summary.hlo_sources(str(tmp_path / 'ours.hlo.txt.gz'))
  assert sources['loop_multiply_fusion_128'] == ('bf16[64,256,4096]',
                                                 'MVARTransformer/blocks_0/ffn/mul')
  assert sources['loop_multiply_fusion_113'][1].endswith('blocks_15/ffn/mul')
  assert sources['input_reduce_fusion_26'][1] == 'VQVAE.decode/decoder/up_0/block_0/norm2/reduce_sum'
  assert 'bitcast_1' not in sources
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}}]
  for i, name in enumerate(['loop_multiply_fusion_128', 'sort_1', 'input_reduce_fusion_26']):
    events.append({'ph': 'X', 'pid': 1, 'tid': 1, 'ts': 10 * i, 'dur': 5, 'name': name})
  with gzip.open(tmp_path / 'ours.trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)
  summary.main([str(tmp_path / 'ours.trace.json.gz')])  # finds the HLO beside the trace
  out = capsys.readouterr().out
  assert '| bf16[64,256,4096] | MVARTransformer/blocks_0/ffn/mul |' in out
  assert 'decoder/up_0/block_0/norm2/reduce_sum |' in out


def test_bench_fusions_decode_smoke_times_each_decode_variant(capsys):
  bench = _load('bench_fusions')
  bench.main(['--smoke', '--parts=decode', '--reps=1', '--inner=1'])
  rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith('decode')]
  assert len(rows) == 7 and '(as before)' in rows[0] and '(default)' in rows[3], rows
  assert 'first 1 stages whole' in rows[3]  # the smoke tokenizer's 4 px stage
  diffs = [float(r.split('max |image diff| ')[1]) for r in rows]
  assert diffs[0] == 0 and 0 < max(diffs) < 0.1  # other variants: bf16 rounding


def test_the_decode_benchmarks_candidate_forms_compute_the_same_functions():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mvar_jax import vqvae
  bench = _load('bench_fusions')
  k1, k2 = jax.random.split(jax.random.key(0))
  y = jax.random.normal(k1, (2, 4, 5, 2, 2, 6)).astype(jnp.bfloat16)
  bias = jax.random.normal(k2, (6,)).astype(jnp.bfloat16)
  # A permutation of the same bf16 sums: bit for bit.
  np.testing.assert_array_equal(bench._phases_as_words(y, bias), vqvae._phases_to_image(y, bias))
  x = jnp.linspace(-8, 8, 101)
  np.testing.assert_allclose(bench._silu_tanh(x), jax.nn.silu(x), rtol=1e-5, atol=1e-6)


def test_bench_fusions_times_the_fused_qkv_kernel_per_tile(capsys):
  bench = _load('bench_fusions')
  bench.main(['--smoke', '--parts=naqkv', '--reps=1', '--inner=1'])
  rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith('naqkv')]
  assert len(rows) == 3 and all('failed' not in r for r in rows), rows  # smoke: 3 tiles
  assert max(float(r.split('max diff ')[1]) for r in rows) < 0.05  # bf16 rounding orders


def test_every_benchmarked_fused_qkv_tile_compiles_for_sm90(tmp_path):
  """A tile the GPU lease would time that Triton cannot build, or that needs more shared
  memory than an H100 block has, must fail here first (tests/cuda_lowering.py)."""
  import jax
  import jax.numpy as jnp
  from mvar_jax.kernels.neighborhood_attention import pallas_common as pc
  from mvar_jax.kernels.neighborhood_attention import pallas_kernel
  from cuda_lowering import compile_for_sm90
  bench = _load('bench_fusions')
  sds = jax.ShapeDtypeStruct
  for i, (block_q, block_k, warps, stages) in enumerate(bench.NAQKV_TILES):
    tiles = pc.BlockSizes(block_q=block_q, block_k=block_k, num_warps=warps, num_stages=stages)
    fn = lambda x, s, b, tiles=tiles: pallas_kernel.na2d_pallas_from_qkv(
        x, s, height=16, width=16, kernel_size=7, bias_3HD=b, block_sizes=tiles,
        interpret=False)
    ((name, kernel),) = compile_for_sm90(
        fn, sds((64, 256, 3, 16, 64), jnp.bfloat16), sds((16,), jnp.float32),
        sds((3, 16, 64), jnp.bfloat16), workdir=tmp_path / str(i)).items()
    assert name == 'na2d_fwd_qkv' and kernel.num_warps == warps


def test_every_benchmarked_fc1_gelu_tile_compiles_for_sm90(tmp_path):
  """As above, for the fc1 + GELU tiles."""
  import functools

  import jax
  import jax.numpy as jnp
  from mvar_jax.kernels import dense_gelu
  from cuda_lowering import compile_for_sm90
  bench = _load('bench_fusions')
  sds = jax.ShapeDtypeStruct
  for i, tile in enumerate(bench.FC1_TILES):
    fn = functools.partial(dense_gelu.dense_gelu_pallas, tiles=dense_gelu.Tiles(*tile),
                           interpret=False)
    ((name, kernel),) = compile_for_sm90(
        fn, sds((10816, 1024), jnp.bfloat16),  # scale 8, padded
        sds((1024, 4096), jnp.bfloat16), sds((4096,), jnp.bfloat16),
        workdir=tmp_path / str(i)).items()
    assert name.startswith('dense_gelu') and kernel.num_warps == tile[3]


def test_bench_checkpoint_runs_from_the_repository_root_on_a_replicated_state(tmp_path):
  import subprocess
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu')
  res = subprocess.run([sys.executable, 'launch/bench_checkpoint.py', '--data=2', '--repeats=1'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'on 2 x cpu' in res.stdout
  rows = [r for r in res.stdout.splitlines() if r.startswith('| ') and not r.startswith('| what')]
  assert [r.split('|')[1].strip() for r in rows] == [
      'fingerprint (save and restore, each)', 'all_finite guard (save)',
      'first Orbax save of the process', 'Orbax save (incl. fingerprint)',
      'Orbax restore (incl. verify)']
  assert all(float(r.split('|')[2]) > 0 for r in rows)


# ----------------------------------------------------------------------------- check_train

def test_check_train_reads_the_no_decay_keys_off_the_official_train_py(tmp_path):
  check = _load('check_train_vs_official')
  (tmp_path / 'train.py').write_text(
      'def build():\n'
      '  names, paras, groups = filter_params(model, nowd_keys={"pos_start", "lvl_embed"})\n')
  assert check.official_no_decay_keys(str(tmp_path)) == {'pos_start', 'lvl_embed'}
  (tmp_path / 'train.py').write_text('def build():\n  pass\n')
  with pytest.raises(SystemExit, match='train.py: no filter_params'):
    check.official_no_decay_keys(str(tmp_path))


@pytest.mark.parametrize('family', ['mvar', 'var'])
def test_check_train_gives_our_trainer_the_official_runs_hyper_parameters(tmp_path, family):
  """The config the check trains with is valid and has the official loop's schedule: same
  peak lr, warm-up and length, its loss and AdamW settings, and each family's schedule."""
  import types
  from mvar_jax import config_utils, optim
  from mvar_jax import transformer as tfm
  check = _load('check_train_vs_official')
  args = check.parse_args([f'--family={family}', f'--official_{family}_src=/nowhere',
                           '--steps=12', '--warmup_steps=3'])
  assert args.grad_clip == check.DEFAULT_CLIP[family, False]
  setup = types.SimpleNamespace(patch_nums=(1, 2, 3, 4, 6), refine_step=4, kernel_size=3)
  t_cfg = tfm.TransformerConfig(depth=1, width=64, num_heads=1, num_classes=10, vocab_size=64,
                                cvae=32, patch_nums=setup.patch_nums)
  config = check.our_config(args, setup, t_cfg)
  # What the check hands the trainer's pieces directly: the tokenizer and token-id batches.
  config.tokenizer.checkpoint = config.data.data_dir = str(tmp_path)
  config.data.name = 'tokens'
  config_utils.validate_config(config, check_mesh=False)
  schedule = optim.Schedule.from_config(config, args.steps)
  assert (schedule.total_steps, schedule.warmup_steps) == (12, 3)
  assert schedule.peak_lr == pytest.approx(args.tblr * args.batch / 256)
  t = config.train
  assert (t.label_smoothing, t.weight_decay, t.weight_decay_end, t.eps, t.grad_clip) == (
      args.label_smoothing, args.weight_decay, args.weight_decay_end, args.adam_eps,
      args.grad_clip)
  assert config.model.drop_path_rate == 0 and config.model.cond_drop_rate == 0
  assert (config.model.attention_mode, t.schedule) == (
      ('mvar', 'segments') if family == 'mvar' else ('var', 'all'))


def test_check_train_needs_the_checkout_of_the_family_it_checks(capsys):
  check = _load('check_train_vs_official')
  with pytest.raises(SystemExit):
    check.parse_args(['--family=var', '--official_mvar_src=/src/MVAR'])
  assert '--family=var needs --official_var_src' in capsys.readouterr().err


def test_check_train_lets_the_official_code_print_with_force():
  import builtins
  check = _load('check_train_vs_official')
  before = builtins.print
  with check._print_accepting_force():
    print('official log line', force=True)
  assert builtins.print is before


def test_bench_train_step_smoke_compares_grad_boundaries_off_and_on(capsys):
  bench = _load('bench_train_step')
  rows = bench.main(['--smoke'])
  assert [r.label for r in rows] == ['MVAR scales 0..3', 'MVAR scale 4']  # the smoke segments
  for row in rows:
    assert row.loss_equal, row
    assert set(row.ms) == {'off', 'on'} and all(ms > 0 for ms in row.ms.values())
  assert '| MVAR scale 4 |' in capsys.readouterr().out


def test_bench_train_step_smoke_compares_transposed_weight_grads(capsys):
  rows = _load('bench_train_step').main(['--smoke', '--field=transposed_weight_grads'])
  assert all(row.loss_equal and set(row.ms) == {'off', 'on'} for row in rows), rows
  assert 'settings of transposed_weight_grads' in capsys.readouterr().out


def test_bench_weight_grad_dots_smoke_times_every_contender(capsys):
  rows = _load('bench_weight_grad_dots').main(['--smoke'])
  [(m, layer, rate)] = rows
  assert (m, layer) == (16, 'tiny')
  assert set(rate) == {'xla dot_general', 'xla transposed copy', 'torch'}
  assert all(r > 0 for r in rate.values())
  assert '| 16 | tiny (32 x 48) |' in capsys.readouterr().out


def test_grad_boundaries_keep_the_backward_fusions_from_growing_with_depth():
  """XLA:CPU copies the residual stream's cotangent chain into every fusion that reads it,
  so without boundaries the largest fusion of a step grows with depth (~80 instructions a
  block here, 1100-1400 at d16); with them it stays the size of one block's backward."""
  import dataclasses
  import flax.linen as nn
  import jax
  from mvar_jax import transformer as tfm
  bench, smoke = _load('bench_train_step'), _load('smoke_configs')
  size = {}
  for depth in (2, 6):
    _, base = smoke.tiny(depth=depth)
    params = nn.unbox(tfm.init_params(base, jax.random.key(0))['params'])
    for setting in ('off', 'on'):
      cfg = dataclasses.replace(base, grad_boundaries=setting)
      compiled, _ = bench.make_step(cfg, params, 2, 0, 3)
      size[setting, depth] = bench.largest_fusion(compiled.as_text())
  growth_off = size['off', 6] - size['off', 2]
  growth_on = size['on', 6] - size['on', 2]
  assert growth_off > 100, size  # the duplication this guards against (else: retire it)
  assert growth_on < growth_off / 4, size
  assert size['on', 6] < size['off', 6] / 2, size


def test_each_official_checkout_is_optional_and_picks_its_rows(capsys):
  bench = _load('bench_vs_official')
  mvar_only = bench.parse_args(['--official_mvar_src=/src/MVAR'])
  assert bench.families_given(mvar_only) == ('mvar',)
  assert mvar_only.samplers == 'official MVAR,ours MVAR'
  var_only = bench.parse_args(['--official_var_src=/src/VAR'])
  assert var_only.samplers == 'official VAR,ours VAR mode'
  both = bench.parse_args(['--official_mvar_src=/a', '--official_var_src=/b'])
  assert both.samplers == ','.join(bench.SAMPLERS)
  assert bench.families_given(both) == ('mvar', 'var')
  with pytest.raises(SystemExit):  # neither: nothing to compare with
    bench.parse_args([])
  assert 'give --official_mvar_src, --official_var_src or both' in capsys.readouterr().err
  with pytest.raises(SystemExit):  # a VAR sampler without the VAR checkout
    bench.parse_args(['--official_mvar_src=/a', '--samplers=ours MVAR,official VAR'])
  assert "'official VAR' needs --official_var_src" in capsys.readouterr().err


def test_bench_cpu_options_times_each_option_set_on_the_same_outputs(capsys):
  bench = _load('bench_cpu_options')
  (row,) = bench.main(['--programs=judge', '--reps=1'])
  name, medians, diff = row
  assert name == 'judge' and list(medians) == list(bench.VARIANTS)
  assert all(t > 0 for t in medians.values())
  assert diff < 1e-5  # the option sets change where the work runs, not what it computes
  assert '| judge |' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='unknown programs'):
    bench.main(['--programs=resnet'])
