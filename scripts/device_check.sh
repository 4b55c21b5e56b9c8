#!/usr/bin/env bash
# One call on a GPU machine: build, HF fixture + peer benchmark, GPU tests, chapter checks, the chapter 02
# benchmark and compute-sanitizer. Logs go to $OUT (default ./device-out). Usage:
#   bash scripts/device_check.sh [all|build|fixture|hfbench|gputests|bench|sanitizer|ep] ...
# On the course's lent GPU machines the Debian dev packages come as .debs/ (see ../shared/tools/device-deps.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
[ -f .debs/unpack.sh ] && bash .debs/unpack.sh >/dev/null && export CMAKE_PREFIX_PATH=/tmp/deps/usr
B=build-device
steps=${*:-all}
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
status=0
run() { local name=$1; shift; echo "== $name: $*"; if ! "$@" > "$OUT/$name.log" 2>&1; then echo "   FAILED ($name), tail:"; tail -20 "$OUT/$name.log"; status=1; else tail -3 "$OUT/$name.log"; fi; }

if has build; then
  run configure cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release
  run build cmake --build $B -j 16 -- -k
  $B/tools/make_model --preset mini --out $B/test-models/mini --seed 1 >/dev/null
fi
if has fixture; then
  run hf_fixture python3 scripts/hf_moe_fixture.py --out tests/data/hf_tiny_phimoe
  tar czf "$OUT/hf_tiny_phimoe.tgz" tests/data/hf_tiny_phimoe
  run unit_tests $B/tests/unit_tests
fi
has hfbench && run hf_bench python3 scripts/hf_moe_bench.py --json "$OUT/hf_moe_bench.json"
if has gputests; then
  run gpu_tests $B/tests/gpu_tests
  run ctest_gpu bash -c "cd $B && ctest -L gpu --output-on-failure -j 4"
fi
if has bench; then
  peer=(); [ -f "$OUT/hf_moe_bench.json" ] && peer=(--peer-json "$OUT/hf_moe_bench.json")
  run bench02 $B/chapters/02_moe_grouped/02_moe_grouped --bench "${peer[@]}" --json "$OUT/bench02.json"
  cat "$OUT/bench02.log"
fi
if has sanitizer; then
  M="--model $B/test-models/mini"
  run memcheck02 compute-sanitizer --tool memcheck --error-exitcode 1 $B/chapters/02_moe_grouped/02_moe_grouped $M --device gpu --tokens 300
  run memcheck01 compute-sanitizer --tool memcheck --error-exitcode 1 $B/chapters/01_moe_naive/01_moe_naive $M --device gpu --tokens 37
fi
if has ep; then  # 2+ GPUs: chapters 03 and 04 on real devices, NCCL, and their benchmarks
  run ctest_ep bash -c "cd $B && ctest -L gpu -R '^ep_|^03_' --output-on-failure"
  run bench04 mpirun --allow-run-as-root -np 2 $B/chapters/04_expert_parallel/04_expert_parallel --bench --json "$OUT/bench04.json"
  cat "$OUT/bench04.log"
  run bench03 $B/chapters/03_manual_placement/03_manual_placement --bench --json "$OUT/bench03.json"
  cat "$OUT/bench03.log"
fi
echo "device_check: $([ $status = 0 ] && echo ALL OK || echo SOME STEPS FAILED)"
exit $status
