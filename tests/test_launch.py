"""The launch scripts: their dry runs print exactly what would run; SLURM requeues on preemption;
the local multi-process launcher starts, prefixes and stops its processes."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')


def run(args, env=None, **kw):
  env = {**os.environ, **(env or {})}
  return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, **kw)


def dry_run(script, *args, env=None) -> list[list[str]]:
  """The commands a script's --dry_run prints, each split as the shell would split it."""
  out = run(['bash', os.path.join(LAUNCH, script), *args, '--dry_run'], env=env)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith('#')]


def flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


# ----------------------------------------------------------------------------- TPU pod

def test_tpu_pod_train_runs_main_on_every_host_with_shared_storage():
  env = {'TPU_NAME': 'pod-a', 'ZONE': 'z1', 'PROJECT': 'p1', 'DATA_DIR': 'gs://b/tfds',
         'MOUNT': '/mnt/nfs', 'CONFIG': 'configs/mvar_d20.py'}
  [argv] = dry_run('tpu_pod.sh', 'train', env=env)
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod-a']
  assert '--worker=all' in argv and flag(argv, 'zone') == 'z1' and flag(argv, 'project') == 'p1'
  remote = shlex.split(flag(argv, 'command'))
  assert remote[:4] == ['cd', '~/mvar-jax', '&&', 'python3']
  assert remote[4] == 'main.py'
  assert flag(remote, 'config') == 'configs/mvar_d20.py'
  assert flag(remote, 'workdir') == '/mnt/nfs/workdirs/mvar_d16'  # on the shared disk
  assert flag(remote, 'config.data.data_dir') == 'gs://b/tfds'  # in the bucket


def test_tpu_pod_create_setup_sample_delete():
  [create] = dry_run('tpu_pod.sh', 'create', env={'ACCELERATOR': 'v5p-64', 'SPOT': 'false'})
  assert create[4:6] == ['create', 'mvar-pod'] and flag(create, 'accelerator-type') == 'v5p-64'
  assert '--spot' not in create
  copy, install = dry_run('tpu_pod.sh', 'setup')
  assert copy[4:6] == ['scp', '--recurse'] and copy[6] == ROOT and '--worker=all' in copy
  assert 'mount -t nfs' in flag(install, 'command') and '--worker=all' in install
  [sample] = dry_run('tpu_pod.sh', 'sample')
  assert shlex.split(flag(sample, 'command'))[-1] == '--mode=sample'
  [delete] = dry_run('tpu_pod.sh', 'delete')
  assert delete[4:6] == ['delete', 'mvar-pod']


# ----------------------------------------------------------------------------- SLURM

@pytest.fixture
def fake_slurm(tmp_path):
  """`scontrol` and `srun` stand-ins on PATH: they log their arguments; srun exits $FAKE_RC."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'calls.log'
  (bin_dir / 'scontrol').write_text(
      '#!/bin/bash\n'
      'if [[ "$1 $2" == "show hostnames" ]]; then printf "gpu-node07\\ngpu-node08\\n"; exit; fi\n'
      f'echo "scontrol $*" >> {log}\n')
  (bin_dir / 'srun').write_text(f'#!/bin/bash\necho "srun $*" >> {log}\nexit ${{FAKE_RC:-0}}\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_JOB_ID': '4242',
         'SLURM_JOB_NODELIST': 'gpu-node[07-08]', 'SLURM_NTASKS': '2', 'SLURM_JOB_NUM_NODES': '2',
         'REPO': '/shared/mvar-jax'}
  return env, log


def test_slurm_dry_run_takes_the_coordinator_from_the_node_list(fake_slurm):
  env, _ = fake_slurm
  [argv] = dry_run('slurm.sbatch', env=env)
  assert argv[0] == 'srun'
  exported = dict(kv.split('=', 1) for kv in flag(argv, 'export').split(',')[1:])
  assert exported == {'COORDINATOR_ADDRESS': 'gpu-node07:29500', 'NUM_PROCESSES': '2'}
  assert argv[-3:-1] == ['bash', '-c']
  task = argv[-1]
  assert task.startswith('export PROCESS_ID=$SLURM_PROCID; cd /shared/mvar-jax && exec python3 '
                         'main.py ')  # each task expands its own rank
  assert 'LOCAL_DEVICE_IDS' not in task  # one task per node drives all its GPUs


def test_slurm_one_task_per_gpu_pins_each_task_to_its_gpu(fake_slurm):
  env, _ = fake_slurm
  env.update(SLURM_NTASKS='16', SLURM_NTASKS_PER_NODE='8')
  [argv] = dry_run('slurm.sbatch', env=env)
  assert 'NUM_PROCESSES=16' in flag(argv, 'export')
  assert 'export LOCAL_DEVICE_IDS=$SLURM_LOCALID; ' in argv[-1]


def _script_preemption_code() -> int:
  text = open(os.path.join(LAUNCH, 'slurm.sbatch')).read()
  [code] = re.findall(r'^EXIT_PREEMPTED=(\d+)$', text, re.M)
  return int(code)


def test_slurm_expects_the_trainers_preemption_exit_code():
  if importlib.util.find_spec('mvar_jax.lifecycle') is not None:
    from mvar_jax import lifecycle
    assert _script_preemption_code() == lifecycle.EXIT_PREEMPTED
  else:  # the value the run lifecycle documents: 128 + SIGTERM
    assert _script_preemption_code() == 128 + 15


@pytest.mark.parametrize('rc,requeued,exit_code', [(143, True, 0), (0, False, 0), (1, False, 1)])
def test_slurm_requeues_only_a_preempted_run(fake_slurm, rc, requeued, exit_code):
  env, log = fake_slurm
  out = run(['bash', os.path.join(LAUNCH, 'slurm.sbatch')], env={**env, 'FAKE_RC': str(rc)})
  assert out.returncode == exit_code, out.stdout + out.stderr
  calls = log.read_text().splitlines()
  assert calls[0].startswith('srun --kill-on-bad-exit=1 ')
  assert ('scontrol requeue 4242' in calls) == requeued


def test_slurm_outside_a_job_says_so():
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  out = subprocess.run(['bash', os.path.join(LAUNCH, 'slurm.sbatch'), '--dry_run'], env=env,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode != 0 and 'not inside a SLURM job' in out.stderr


# ----------------------------------------------------------------------------- one GPU host

def test_gpu_host_dry_run():
  [argv] = dry_run('gpu_host.sh', env={'GPUS': '0,1', 'WORKDIR': '/w', 'EXTRA_FLAGS':
                                       '--config.mesh.fsdp=2 --config.train.batch_size=64'})
  assert argv[:4] == ['env', 'CUDA_VISIBLE_DEVICES=0,1', 'python3', 'main.py']
  assert flag(argv, 'mode') == 'train' and flag(argv, 'workdir') == '/w'
  assert argv[-2:] == ['--config.mesh.fsdp=2', '--config.train.batch_size=64']


# ----------------------------------------------------------------------------- local processes

def launcher(*args):
  return [sys.executable, os.path.join(LAUNCH, 'local_multiprocess.py'), *args]


def test_local_launcher_dry_run_gives_each_process_its_start_up():
  out = run(launcher('--num_processes=2', '--cpu_devices=4', '--port=999', '--dry_run', '--',
                     'python', 'main.py', '--workdir=a b'))
  lines = out.stdout.splitlines()
  assert lines == [
      f'COORDINATOR_ADDRESS=127.0.0.1:999 NUM_PROCESSES=2 PROCESS_ID={i} JAX_PLATFORMS=cpu '
      "JAX_NUM_CPU_DEVICES=4 JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo python main.py "
      "'--workdir=a b' &" for i in range(2)] + ['wait']
  gpu = run(launcher('--num_processes=2', '--platform=gpu', '--gpus=8', '--port=1', '--dry_run',
                     '--', 'python', 'main.py'))
  assert 'LOCAL_DEVICE_IDS=4,5,6,7' in gpu.stdout.splitlines()[1]


def test_local_launcher_prefixes_output_and_stops_the_others_when_one_fails(tmp_path):
  # Process 1 fails only once process 0 has printed: on a busy machine process 0's start-up
  # could otherwise outlast process 1 and the launcher's grace period.
  flag = str(tmp_path / 'p0_printed')
  code = ('import os, sys, time; i = int(os.environ["PROCESS_ID"]); print("hello", i, flush=True)\n'
          f'if i == 0:\n  open({flag!r}, "w").close(); time.sleep(300)\n'
          f'deadline = time.time() + 60\n'
          f'while not os.path.exists({flag!r}) and time.time() < deadline: time.sleep(0.05)\n'
          'sys.exit(7)')
  out = run(launcher('--num_processes=2', '--grace_s=1', '--', sys.executable, '-c', code))
  assert out.returncode == 7  # well before process 0's 300 s sleep would end (timeout=120)
  assert '[p0] hello 0' in out.stdout and '[p1] hello 1' in out.stdout
  assert 'stopping the others' in out.stdout
