"""Runs N JAX processes on this machine as one multi-process job (how multi-host code is debugged).

    # 2 processes x 4 simulated CPU devices, CPU collectives through gloo:
    python launch/local_multiprocess.py --num_processes=2 --cpu_devices=4 -- \
        python main.py --config=configs/demo.py --workdir=workdirs/mp --config.demo=False ...
    # 2 processes on one 8-GPU host, 4 GPUs each:
    python launch/local_multiprocess.py --num_processes=2 --platform=gpu -- python main.py ...
    # Print the environment and commands only:
    python launch/local_multiprocess.py --num_processes=2 --dry_run -- python main.py ...

Each process gets the env-var start-up that mvar_jax.sharding.initialize_distributed() knows:
COORDINATOR_ADDRESS=127.0.0.1:<free port>, NUM_PROCESSES, PROCESS_ID (plus, on GPU,
LOCAL_DEVICE_IDS naming its share of the GPUs). Output lines are prefixed with [p<i>]. When a
process fails, the others are stopped (SIGTERM, then SIGKILL after --grace_s); SIGTERM/SIGINT to
the launcher are passed on to every process. Exits with the first non-zero exit code (or 0).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_envs(num_processes: int, *, port: int, platform: str, cpu_devices: int,
                 gpus: int) -> list[dict[str, str]]:
  """The extra environment of each process (what differs from the launcher's own)."""
  envs = []
  for i in range(num_processes):
    env = {'COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'NUM_PROCESSES': str(num_processes),
           'PROCESS_ID': str(i)}
    if platform == 'cpu':
      env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(cpu_devices),
                 # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
                 JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
    else:
      if gpus % num_processes:
        raise ValueError(f'--gpus={gpus} must be a multiple of --num_processes={num_processes}')
      per = gpus // num_processes
      env['LOCAL_DEVICE_IDS'] = ','.join(str(g) for g in range(i * per, (i + 1) * per))
    envs.append(env)
  return envs


def _pump(stream, prefix: str) -> None:
  for line in iter(stream.readline, ''):
    sys.stdout.write(f'{prefix} {line}')
    sys.stdout.flush()


def run(command: list[str], envs: list[dict[str, str]], *, grace_s: float) -> int:
  procs = [subprocess.Popen(command, env={**os.environ, **e}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1) for e in envs]
  pumps = [threading.Thread(target=_pump, args=(p.stdout, f'[p{i}]'), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()

  def stop_all(sig=signal.SIGTERM):
    for p in procs:
      if p.poll() is None:
        p.send_signal(sig)

  def forward(signum, _):
    stop_all(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  def running():
    return [p for p in procs if p.poll() is None]  # polls every process (sets returncode)

  code = 0
  while running():
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed and not code:
      code = failed[0]
      sys.stdout.write(f'[launcher] a process exited with {code}: stopping the others\n')
      stop_all()
      deadline = time.time() + grace_s
      while time.time() < deadline and running():
        time.sleep(0.1)
      stop_all(signal.SIGKILL)
    time.sleep(0.1)
  for t in pumps:
    t.join(timeout=5)
  return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--platform', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--cpu_devices', type=int, default=4,
                      help='simulated CPU devices per process (--platform=cpu)')
  parser.add_argument('--gpus', type=int, default=8,
                      help='GPUs on this host, split evenly over the processes (--platform=gpu)')
  parser.add_argument('--port', type=int, default=0, help='coordinator port; 0 = a free one')
  parser.add_argument('--grace_s', type=float, default=30.0,
                      help='seconds between SIGTERM and SIGKILL when a process failed')
  parser.add_argument('--dry_run', action='store_true', help='print what would run, run nothing')
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the command to run')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  if args.num_processes < 1:
    parser.error(f'--num_processes must be >= 1, got {args.num_processes}')
  port = args.port or (12345 if args.dry_run else free_port())
  envs = process_envs(args.num_processes, port=port, platform=args.platform,
                      cpu_devices=args.cpu_devices, gpus=args.gpus)
  if args.dry_run:
    for e in envs:
      print(' '.join(f'{k}={shlex.quote(v)}' for k, v in e.items()), shlex.join(command), '&')
    print('wait')
    return 0
  return run(command, envs, grace_s=args.grace_s)


if __name__ == '__main__':
  sys.exit(main())
