#!/usr/bin/env bash
# One train_step.py run per XLA flag set (a flag is read once, at backend start, so each
# set needs its own process), with --profile: how each set moves GPU time by kernel kind.
# Usage: bash benchmarks/flag_sweep.sh OUTDIR [extra train_step.py args]
# Variants are lines of VARIANTS below: "name|XLA_FLAGS".
set -u
out=$1; shift
mkdir -p "$out"; out=$(cd "$out" && pwd)
VARIANTS=${VARIANTS:-"base|
no_triton_gemm|--xla_gpu_enable_triton_gemm=false
cublaslt|--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true
warp_spec|--xla_gpu_experimental_enable_triton_warp_specialization=true
heroless|--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true
cudnn_gemm_fusion|--xla_gpu_cudnn_gemm_fusion_level=2
block_level_rewriter|--xla_gpu_experimental_enable_fusion_block_level_rewriter=true
unroll8|--xla_gpu_experimental_max_unroll_factor=8
no_command_buffer|--xla_gpu_enable_command_buffer="}
while IFS='|' read -r name flags; do
  [ -z "$name" ] && continue
  echo "=== $name: $flags"
  XLA_FLAGS="$flags" timeout "${RUN_TIMEOUT:-80}" python3 benchmarks/train_step.py --no-peer --profile \
    --json "$out/$name.json" "$@" > "$out/$name.log" 2>&1
  echo "rc=$?"; grep -E "^(1b|7b|tiny) " "$out/$name.log" | cut -c1-400
  tail -n 3 "$out/$name.log" | grep -iE "error|unknown" | cut -c1-300
done <<< "$VARIANTS"
