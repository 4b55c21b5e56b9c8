#!/usr/bin/env bash
# usage: gpu_or_skip.sh HAS_GPU_BINARY COMMAND...   runs COMMAND when a GPU is usable, else skips (exit 77).
has_gpu=$1; shift
if ! "$has_gpu"; then echo "SKIPPED: no usable GPU"; exit 77; fi
exec "$@"
