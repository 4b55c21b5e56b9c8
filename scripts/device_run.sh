#!/usr/bin/env bash
# On a GPU machine: build, tests, benchmarks in one call. Builds, runs the named steps, writes their logs under
# $OUT (tarred into logs.tgz at the end) and a summary to stdout.
# Usage: bash scripts/device_run.sh STEP...   Steps, in the order they run:
#   build      configure + build everything in build-device, make the mini model
#   fixture    regenerate the HF fixture (scripts/hf_moe_fixture.py) and run unit_tests on it
#   hfbench    the HF peer for chapter 02 (scripts/hf_moe_bench.py -> hf_moe_bench.json, used by bench02)
#   hfbench05  the HF peer for chapter 05 (scripts/hf_model_bench.py -> hf_model_bench.json, used by bench05)
#   gputests   gpu_tests with a summary of failures and key measurements
#   ctestgpu   ctest -L gpu without the 2-GPU tests         ep        the 2-GPU tests (ep_*, 03_*, np2)
#   viz        the visualizer's GPU routing tests           sanitizer compute-sanitizer on chapters 01/02
#   bench02    chapter 02 --bench (with the peer if hfbench ran)   bench02x3  three short bench02 runs (spread)
#   bench02s   chapter 02 --bench with the expert strategies interleaved, write and read L2 flush
#   ncu02      Nsight Compute on chapter 02's single kernels at T = 1 and 4096
#   phi        make the full-size Phi-tiny-shaped checkpoint in /tmp/phi (bench05, bench05ep need it)
#   bench05    chapter 05 --bench + a generation, EP = 1    bench05ep  the same with EP = 2 (2 GPUs)
#   bench04    chapter 04 --bench on 2 ranks                bench03    chapter 03 --bench on 1 and 2 GPUs
#   bench04c   chapter 04 --bench with --chunks 1 2 4 8 at 4096 and 16384 tokens per rank, with timelines
#   bench04np1 chapter 04 --bench on ONE rank (no peer traffic): the bookkeeping's own cost, with its timeline
#   sanitizer04 compute-sanitizer memcheck of chapter 04's engine on one rank (top-2 and top-4, chunked or not)
#   racecheck  compute-sanitizer racecheck of chapters 01, 02 and 04 (one rank)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
[ -f .debs/unpack.sh ] && bash .debs/unpack.sh >/dev/null && export CMAKE_PREFIX_PATH=/tmp/deps/usr
B=build-device
steps=" $* "
has() { [[ "$steps" == *" $1 "* ]]; }
mpirun_=(mpirun --allow-run-as-root --oversubscribe)
log() { echo "== $1"; }
if has build; then
  cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release > "$OUT/configure.log" 2>&1 || tail -20 "$OUT/configure.log"
  cmake --build $B -j 16 -- -k > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; grep -E "error" "$OUT/build.log" | head -20; }
  grep -E "visualizer|05_phi|eplab_ep" "$OUT/configure.log" | head -5
  $B/tools/make_model --preset mini --out $B/test-models/mini --seed 1 >/dev/null
fi
if has fixture; then
  log fixture; python3 scripts/hf_moe_fixture.py --out tests/data/hf_tiny_phimoe > "$OUT/hf_fixture.log" 2>&1; tail -3 "$OUT/hf_fixture.log"
  tar czf "$OUT/hf_tiny_phimoe.tgz" tests/data/hf_tiny_phimoe
  $B/tests/unit_tests > "$OUT/unit_tests.log" 2>&1; grep -E "^\[doctest\] (test cases|Status)" "$OUT/unit_tests.log"
fi
if has hfbench; then
  log hfbench; python3 scripts/hf_moe_bench.py --json "$OUT/hf_moe_bench.json" > "$OUT/hf_bench.log" 2>&1; tail -12 "$OUT/hf_bench.log"
fi
if has gputests; then
  log gpu_tests; $B/tests/gpu_tests > "$OUT/gpu_tests.log" 2>&1
  grep -E "^\[doctest\] (test cases|assertions)" "$OUT/gpu_tests.log"
  grep -B3 -A4 "ERROR" "$OUT/gpu_tests.log" | head -60
  grep -E "MESSAGE: (teacher-forced per-row|batch of|greedy:|layer [01] (MoE output|residual)|prefill of|sequence [0-9] alone)" "$OUT/gpu_tests.log" | head -30
fi
if has ctestgpu; then
  log ctest_gpu; (cd $B && ctest -L gpu -E '^ep_gpu_np2|np2|same_tokens' --output-on-failure -j 4 > "$OUT/ctest_gpu.log" 2>&1)
  grep -E "tests passed|Failed|\(Failed\)|\*\*\*Failed" "$OUT/ctest_gpu.log" | head -20
fi
if has viz; then
  log viz; (cd $B && ctest -R 'viz_routing|viz_compare|viz_print' --output-on-failure > "$OUT/ctest_viz.log" 2>&1)
  grep -E "tests passed|Failed|Skipped|Passed" "$OUT/ctest_viz.log" | head -12
fi
if has bench02; then
  peer=(); [ -f "$OUT/hf_moe_bench.json" ] && peer=(--peer-json "$OUT/hf_moe_bench.json")
  log bench02; $B/chapters/02_moe_grouped/02_moe_grouped --bench "${peer[@]}" --json "$OUT/bench02.json" > "$OUT/bench02.log" 2>&1
  tail -40 "$OUT/bench02.log"
fi
if has sanitizer; then
  log sanitizer; M="--model $B/test-models/mini"
  i=0; for ch in "02_moe_grouped/02_moe_grouped $M --device gpu --tokens 300" "02_moe_grouped/02_moe_grouped $M --device gpu --tokens 5" \
            "01_moe_naive/01_moe_naive $M --device gpu --tokens 37"; do
    i=$((i + 1)); compute-sanitizer --tool memcheck --error-exitcode 1 $B/chapters/$ch > "$OUT/memcheck$i.log" 2>&1
    echo "memcheck $ch: rc $?"; grep -E "ERROR SUMMARY" "$OUT/memcheck$i.log"
  done
  for T in 1000 4096; do  # Auto runs the padded experts strategy above 32 rows
    compute-sanitizer --tool memcheck --error-exitcode 1 \
      $B/chapters/02_moe_grouped/02_moe_grouped $M --device gpu --tokens $T > "$OUT/memcheck_padded_$T.log" 2>&1
    echo "memcheck chapter 02 T=$T: rc $?"
  done
fi
if has ncu02; then
  # Single kernels of chapter 02's layer under Nsight Compute (real clocks; ncu flushes caches before each
  # kernel, like the bench's cold L2). T = 1 (direct path) and T = 4096 (grouped path), after warm-up launches.
  log ncu02; X=$B/chapters/02_moe_grouped/02_moe_grouped
  for T in 1 4096; do
    timeout 240 ncu --clock-control none --launch-skip 40 --launch-count 12 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
      $X --bench --bench-tokens $T > "$OUT/ncu02_T$T.log" 2>&1
    grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Grid Size|Block Size" "$OUT/ncu02_T$T.log" | head -120
  done
fi
if has bench02s; then  # expert strategies interleaved in one run, with both L2 flush kinds (chapter 02 README)
  log bench02s; X=$B/chapters/02_moe_grouped/02_moe_grouped
  $X --bench --bench-tokens 1 8 64 512 4096 16384 --bench-experts cublas-streams,cublas-padded,cublas-grouped \
    --json "$OUT/bench02_write.json" > "$OUT/bench02_write.log" 2>&1; tail -70 "$OUT/bench02_write.log"
  $X --bench --flush read --bench-tokens 1 8 4096 16384 --bench-experts cublas-streams,cublas-padded \
    --json "$OUT/bench02_read.json" > "$OUT/bench02_read.log" 2>&1; tail -50 "$OUT/bench02_read.log"
fi
if has bench02x3; then
  log bench02x3; X=$B/chapters/02_moe_grouped/02_moe_grouped
  for rep in 1 2 3; do $X --bench --bench-tokens 1 8 4096 16384 > "$OUT/bench02_rep$rep.log" 2>&1; grep -E "^(1|8|4096|16384) " "$OUT/bench02_rep$rep.log"; done
fi
if has phi; then
  [ -d /tmp/phi ] || $B/tools/make_model --preset phi-tiny --out /tmp/phi --seed 3 > "$OUT/phi_gen.log" 2>&1
fi
if has hfbench05; then
  log hfbench05; python3 scripts/hf_model_bench.py --json "$OUT/hf_model_bench.json" > "$OUT/hf_model_bench.log" 2>&1; tail -14 "$OUT/hf_model_bench.log"
fi
if has bench05; then
  peer05=(); [ -f "$OUT/hf_model_bench.json" ] && peer05=(--peer-json "$OUT/hf_model_bench.json")
  log bench05; "${mpirun_[@]}" -np 1 $B/chapters/05_phi_tiny_ep/05_phi_tiny_ep --model /tmp/phi --device gpu --bench "${peer05[@]}" --json "$OUT/bench05_np1.json" > "$OUT/bench05_np1.log" 2>&1
  tail -22 "$OUT/bench05_np1.log"
  "${mpirun_[@]}" -np 1 $B/chapters/05_phi_tiny_ep/05_phi_tiny_ep --model /tmp/phi --device gpu --prompt-ids 1,450,4996,338,263 --max-new-tokens 32 --ignore-eos > "$OUT/ch05_phi_np1.log" 2>&1
  tail -12 "$OUT/ch05_phi_np1.log"
fi
if has ep; then
  log ctest_ep; (cd $B && ctest -L gpu -R '^ep_|^03_|np2|same_tokens' --output-on-failure > "$OUT/ctest_ep.log" 2>&1)
  grep -E "tests passed|\(Failed\)|Passed|Skipped" "$OUT/ctest_ep.log" | head -40
fi
if has bench05ep; then
  log bench05ep; "${mpirun_[@]}" -np 2 $B/chapters/05_phi_tiny_ep/05_phi_tiny_ep --model /tmp/phi --device gpu --bench --json "$OUT/bench05_np2.json" > "$OUT/bench05_np2.log" 2>&1
  tail -22 "$OUT/bench05_np2.log"
  "${mpirun_[@]}" -np 2 $B/chapters/05_phi_tiny_ep/05_phi_tiny_ep --model /tmp/phi --device gpu --prompt-ids 1,450,4996,338,263 --max-new-tokens 32 --ignore-eos > "$OUT/ch05_phi_np2.log" 2>&1
  tail -16 "$OUT/ch05_phi_np2.log"
fi
if has bench04; then
  log bench04; "${mpirun_[@]}" -np 2 $B/chapters/04_expert_parallel/04_expert_parallel --bench --json "$OUT/bench04.json" > "$OUT/bench04.log" 2>&1
  tail -30 "$OUT/bench04.log"
fi
if has bench04c; then  # the chunked pipeline: inplace with 1, 2, 4, 8 pieces per peer message, and the timelines
  log bench04c; "${mpirun_[@]}" -np 2 $B/chapters/04_expert_parallel/04_expert_parallel --bench --bench-tokens 4096 16384 \
    --chunks 1 2 4 8 --json "$OUT/bench04_chunks.json" > "$OUT/bench04_chunks.log" 2>&1
  tail -60 "$OUT/bench04_chunks.log"
fi
if has bench04np1; then  # one GPU: what the plan, count exchange, host wait, permute and combine cost alone
  log bench04np1; "${mpirun_[@]}" -np 1 $B/chapters/04_expert_parallel/04_expert_parallel --bench --bench-tokens 4096 16384 \
    --chunks 1 2 --json "$OUT/bench04_np1.json" > "$OUT/bench04_np1.log" 2>&1
  tail -60 "$OUT/bench04_np1.log"
fi
if has sanitizer04; then
  log sanitizer04; X=$B/chapters/04_expert_parallel/04_expert_parallel; M="--model $B/test-models/mini"
  i=0; for a in "--tokens 300 --layout inplace" "--tokens 300 --layout inplace --chunks 3" \
               "--tokens 77 --router softmax --top-k 4 --layer 2 --layout inplace" \
               "--tokens 77 --router softmax --top-k 4 --layer 2 --layout inplace --chunks 2" "VARY --layout inplace"; do
    # --report-api-errors no: NCCL's init probes kernels built for other GPUs (cudaFuncGetAttributes ->
    # cudaErrorNoKernelImageForDevice, handled inside NCCL); our own API errors end the run through CUDA_CHECK.
    # VARY: the engine under changing batch sizes (tests/mpi/ep_engine_checks --vary)
    bin=$X; [[ "$a" == VARY* ]] && { bin=$B/tests/mpi/ep_engine_checks; a="--vary${a#VARY}"; }
    i=$((i + 1)); "${mpirun_[@]}" -np 1 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 $bin $M --device gpu $a \
      > "$OUT/memcheck04_$i.log" 2>&1
    echo "memcheck 04 $a: rc $?"; grep -E "ERROR SUMMARY|CHECK (PASS|FAIL)" "$OUT/memcheck04_$i.log" | head -3
  done
fi
if has racecheck; then  # shared-memory races in the kernels of chapters 01, 02 and 04 (one rank)
  log racecheck; M="--model $B/test-models/mini"
  i=0; for ch in "01_moe_naive/01_moe_naive --tokens 37" "02_moe_grouped/02_moe_grouped --tokens 5" \
                 "02_moe_grouped/02_moe_grouped --tokens 300" "04_expert_parallel/04_expert_parallel --tokens 300 --layout inplace"; do
    i=$((i + 1)); "${mpirun_[@]}" -np 1 compute-sanitizer --tool racecheck --report-api-errors no --error-exitcode 1 \
      $B/chapters/${ch%% *} $M --device gpu ${ch#* } > "$OUT/racecheck$i.log" 2>&1
    echo "racecheck $ch: rc $?"; grep -E "RACECHECK SUMMARY|ERROR SUMMARY|CHECK (PASS|FAIL)" "$OUT/racecheck$i.log" | head -3
  done
fi
if has bench03; then
  log bench03; for g in 1 2; do $B/chapters/03_manual_placement/03_manual_placement --bench --gpus $g > "$OUT/bench03_g$g.log" 2>&1; tail -15 "$OUT/bench03_g$g.log"; done
  $B/chapters/03_manual_placement/03_manual_placement --model $B/test-models/mini --device gpu --gpus 2 --tokens 1000 > "$OUT/ch03_split.log" 2>&1; tail -25 "$OUT/ch03_split.log"
fi
cd "$OUT" && ls *.log > /dev/null 2>&1 && tar czf logs.tgz *.log *.json 2>/dev/null; rm -f "$OUT"/*.log "$OUT"/*.json
echo "device_run: done"
