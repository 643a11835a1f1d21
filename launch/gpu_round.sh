#!/bin/bash
# One round of GPU measurements for a short lease (an H100 / H200), most important first.
#
#   OFFICIAL=/src bash launch/gpu_round.sh [OUT_DIR]     # /src/MVAR and /src/VAR checkouts
#   bash launch/gpu_round.sh --sources                   # the hash its versions.txt records
#
# 0. PARTS=... (default none): bench_fusions.py on those parts first: decode (the sampler's
#    decode of 32 images: small-map stages whole or in chunks, conv_out as a conv or as tap
#    sums, GroupNorm's sums by XLA or the Pallas kernel, ...), naqkv (the fused qkv attention
#    kernel's tiles at 13x13 and 16x16; all compile for sm_90 without spills), gn, gelu, ...
#    (SELECT=1 adds select). The decode defaults won on an H100 on 2026-11-27.
# 1. bench_vs_official.py, d16, batch 32: official VAR (KV cache) against ours (MVAR, bf16
#    transformer params, bf16 VQ-VAE decode), same weights, interleaved: each call timed alone
#    (latency), then 8 calls back to back per timing (throughput, as a sampling job runs).
#    $SAMPLERS picks others: official MVAR, 'ours MVAR (Triton GEMM)' (XLA's default GEMMs),
#    'ours MVAR (unfused qkv)', 'ours MVAR (Pallas FFN)', and three against the gaps between
#    kernels ('ours MVAR (PDL)', '(concurrent graph regions)', '(graph loops unrolled)': each
#    1-4% slower than the default on an H200, 2026-11-27);
#    then per-contender memory probes in fresh processes (ours: loaded from the compilation
#    cache this run fills, XLA memory/cost analysis, and a jax.profiler trace of one call ->
#    OUT_DIR/*.trace.json.gz, summarised here with launch/trace_summary.py).
# 1b. SAMPLE_MODE=1 (default): bench_sample_mode.py, the real sample mode (shards, npz) at d16,
#    batch 32, bf16 params (sample.param_dtype), random weights: images/s, and the rate of a
#    long job. Needs ml_collections (configs/): wheels in .whl/ are installed first when
#    present (the device README's wheel recipe: `pip download ... ml_collections`).
# 2. OPTIONS=1: bench_fusions.py --parts=options: the last-scale forward and a decode chunk
#    under XLA option sets that could fold the GELU/norm passes into cuBLAS/cuDNN.
#    XLA_AB="--xla_gpu_...": step 1 again (official VAR, ours MVAR) in a process with those
#    XLA_FLAGS, to compare with step 1's rows.
# 2c. EPILOGUES=1: check_gemm_epilogues.py, which forms of the FFN's bias + GELU and the qkv
#    bias XLA folds into cuBLAS's epilogue, under which options (~1 min).
# 3. The Pallas neighbourhood kernel's tiles: forward at the sampler's shapes (13x13 and 16x16,
#    batch 64 = 32 with CFG, 16 heads) and forward+backward at 32x32 (training at 512 px).
#    Tuned on 2026-11-26 (defaults kept): only with TILES=1.
# Each step has its own time limit so that a stall costs one step, not the lease. On an H100
# (2026-11-27) step 1 with three of ours took ~4 min (ours compiles in ~50 s, 85 s with Triton
# GEMMs), PARTS=decode ~40 s.
# Logs and tables go to OUT_DIR (default $OUT, the device tool's return folder, else /tmp/gpu_round).

set -uo pipefail
sources_hash() {  # sha1 of the Python sources in mvar_jax/ and launch/, as they are on disk
  find mvar_jax launch -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort \
    | xargs sha1sum | sha1sum | cut -c1-12
}
[[ "${1:-}" == --sources ]] && { sources_hash; exit 0; }
OUT_DIR=${1:-${OUT:-/tmp/gpu_round}}
OFFICIAL=${OFFICIAL:-.offsrc}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export MVAR_COMPILATION_CACHE_DIR=${MVAR_COMPILATION_CACHE_DIR:-/tmp/mvar_xla_cache}
# The lent machines measured 4.3 TB/s copy and ~790 TFLOP/s bf16 matmul (H200); H100: 3.0 / 798.
HBM_GBPS=${HBM_GBPS:-4300}
PEAK_TFLOPS=${PEAK_TFLOPS:-790}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c 'import jax, jaxlib, flax, torch, triton; print("jax", jax.__version__, "jaxlib",
jaxlib.__version__, "flax", flax.__version__, "torch", torch.__version__, "triton",
triton.__version__, jax.devices())'
  # The device gets the working tree, but its .git can be older (the session's first commit):
  # the hash of the sources says what ran (`bash launch/gpu_round.sh --sources` on a checkout).
  echo "sources: $(sources_hash)"
} 2>&1 | tee "$OUT_DIR/versions.txt"

PARTS=${PARTS-}; [[ "${SELECT:-0}" == 1 ]] && PARTS=select${PARTS:+,$PARTS}
if [[ -n "$PARTS" ]]; then
  echo "=== 0. bench_fusions --parts=$PARTS ===" | tee -a "$OUT_DIR/log.txt"
  timeout ${FUSIONS_TIMEOUT:-200} $PY launch/bench_fusions.py --parts=$PARTS --reps=5 2>&1 \
    | grep -v -E '^\s*$|Warning' | tee -a "$OUT_DIR/log.txt"
fi

echo "=== 1. side by side, d16 batch 32 ===" | tee -a "$OUT_DIR/log.txt"
DEFAULT_SAMPLERS="official VAR,ours MVAR"
timeout ${VS_TIMEOUT:-420} $PY launch/bench_vs_official.py \
    --official_mvar_src="$OFFICIAL/MVAR" --official_var_src="$OFFICIAL/VAR" \
    --depth=16 --batch=32 "--samplers=${SAMPLERS:-$DEFAULT_SAMPLERS}" --skip_train \
    --reps=5 --warmup=1 --na2d_fallback=sdpa --param_dtype=bfloat16 \
    --trace_dir="$OUT_DIR" --json_out="$OUT_DIR/vs_official.json" 2>&1 \
  | grep -v -E '^\s*$|Warning|warn\(' | tee -a "$OUT_DIR/log.txt"
for trace in "$OUT_DIR"/*.trace.json.gz; do
  [[ -e "$trace" ]] || continue
  echo "=== trace: $(basename "$trace") ===" | tee -a "$OUT_DIR/log.txt"
  timeout 60 $PY launch/trace_summary.py --top=30 "$trace" 2>&1 | tee -a "$OUT_DIR/log.txt"
done

if [[ "${SAMPLE_MODE:-1}" == 1 ]]; then
  echo "=== 1b. sample mode, d16 batch 32 ===" | tee -a "$OUT_DIR/log.txt"
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  timeout ${SAMPLE_MODE_TIMEOUT:-200} $PY launch/bench_sample_mode.py \
      --config=configs/mvar_d16.py --batch_size=32 --param_dtype=bfloat16 \
      --num_images=${SAMPLE_MODE_IMAGES:-512} 2>&1 \
    | tr '\r' '\n' | grep -v -E '^\s*$|Warning|img/s\]' | tee -a "$OUT_DIR/log.txt"
fi

if [[ "${OPTIONS:-0}" == 1 ]]; then
  echo "=== 2. XLA option sets: last-scale forward, decode chunk ===" | tee -a "$OUT_DIR/log.txt"
  timeout ${OPTIONS_TIMEOUT:-300} $PY launch/bench_fusions.py --parts=options 2>&1 \
    | grep -v -E '^\s*$|Warning' | tee -a "$OUT_DIR/log.txt"
fi

if [[ -n "${XLA_AB:-}" ]]; then
  echo "=== 2b. side by side under XLA_FLAGS=$XLA_AB ===" | tee -a "$OUT_DIR/log.txt"
  XLA_FLAGS="${XLA_FLAGS:-} $XLA_AB" timeout ${VS_TIMEOUT:-420} $PY launch/bench_vs_official.py \
      --official_mvar_src="$OFFICIAL/MVAR" --official_var_src="$OFFICIAL/VAR" \
      --depth=16 --batch=32 "--samplers=official VAR,ours MVAR" --skip_train --reps=5 \
      --warmup=1 --na2d_fallback=sdpa --param_dtype=bfloat16 \
      --json_out="$OUT_DIR/vs_official_xla_ab.json" 2>&1 \
    | grep -v -E '^\s*$|Warning|warn\(' | tee -a "$OUT_DIR/log.txt"
fi

if [[ "${EPILOGUES:-0}" == 1 ]]; then
  echo "=== 2c. GEMM epilogues: bias and GELU forms ===" | tee -a "$OUT_DIR/log.txt"
  timeout ${EPILOGUES_TIMEOUT:-120} $PY launch/check_gemm_epilogues.py 2>&1 \
    | grep -v -E '^\s*$|Warning' | tee -a "$OUT_DIR/log.txt"
fi

[[ "${TILES:-0}" == 1 ]] || { date -u | tee -a "$OUT_DIR/log.txt"; exit 0; }
echo "=== 3. Pallas tiles ===" | tee -a "$OUT_DIR/log.txt"
CONFIGS='q=64,k=64;q=32,k=32;q=64,k=32;q=128,k=64;q=128,k=64,warps=8;q=64,k=64,stages=3;q=32,k=64'
timeout ${TILES_TIMEOUT:-130} $PY launch/bench_neighborhood_attention.py --impls=pallas \
    --maps=13x13,16x16 --batches=64 --heads=16 --passes=fwd --noisolate --reps=10 \
    --hbm_gbps=$HBM_GBPS --peak_tflops=$PEAK_TFLOPS --pallas_configs="$CONFIGS" \
    --json_out="$OUT_DIR/tiles.jsonl" 2>&1 | grep -v -E '^\s*$|Warning' | tee -a "$OUT_DIR/log.txt"
BWD='q=64,k=64;q_dq=32,k_dq=32,q_dkv=32,k_dkv=32;q_dq=64,k_dq=32,q_dkv=32,k_dkv=64;q=128,k=64,warps_bwd=8;stages=3,stages_bwd=3'
timeout ${TILES_BWD_TIMEOUT:-110} $PY launch/bench_neighborhood_attention.py --impls=pallas \
    --maps=32x32 --batches=32 --heads=16 --passes=fwd+bwd --noisolate --reps=10 \
    --hbm_gbps=$HBM_GBPS --peak_tflops=$PEAK_TFLOPS --pallas_configs="$BWD" \
    --json_out="$OUT_DIR/tiles.jsonl" 2>&1 | grep -v -E '^\s*$|Warning' | tee -a "$OUT_DIR/log.txt"
date -u | tee -a "$OUT_DIR/log.txt"
