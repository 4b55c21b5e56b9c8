#!/usr/bin/env bash
# usage: ep_gpu_or_skip.sh HAS_GPU_BINARY MIN_GPUS COMMAND...
# Runs COMMAND when at least MIN_GPUS CUDA GPUs are usable, else prints SKIPPED and exits 77 (ctest: Skipped).
has_gpu=$1; need=$2; shift 2
n=$("$has_gpu" | grep -o '^[0-9]*' || true)
n=${n:-0}
if [ "$n" -lt "$need" ]; then echo "SKIPPED: needs $need GPU(s), found $n"; exit 77; fi
export EPLAB_GPUS=$n  # for commands that need the count (e.g. one rank more than there are GPUs)
exec "$@"
