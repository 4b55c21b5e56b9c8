#!/usr/bin/env bash
# Runs one libFuzzer target (fuzz/README.md). Three modes:
#   run.sh replay BIN CORPUS_DIR [REGRESSION_DIR]  every file of the seed corpus and the regressions, once each
#   run.sh runs   BIN CORPUS_DIR N WORK_DIR          fuzz N inputs with a fixed seed (the CI pass: the same tree
#                                                    fuzzes the same inputs every time); WORK_DIR starts empty
#   run.sh time   BIN CORPUS_DIR SECONDS WORK_DIR    fuzz for SECONDS with a random seed (make fuzz); new inputs
#                                                    collect in WORK_DIR/corpus and are reused next time
# Committed seeds are only read. A finding is saved as WORK_DIR/crash-* (or leak-*, timeout-*, oom-*); the
# message says how to replay it and where to commit it once it is fixed.
set -uo pipefail
mode=${1:?mode: replay, runs or time}
bin=${2:?fuzzer binary}
corpus=${3:?seed corpus directory}
name=$(basename "$bin"); name=${name#fuzz_}
here=$(cd "$(dirname "$0")" && pwd)
# Limits every mode shares: an input that takes 10 s is a hang; 2 GB is a runaway allocation.
common=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# Reports name functions and lines when clang's symbolizer is found (Debian's llvm-14 has it off PATH).
if ! command -v llvm-symbolizer >/dev/null && [ -x /usr/lib/llvm-14/bin/llvm-symbolizer ]; then
  export ASAN_SYMBOLIZER_PATH=/usr/lib/llvm-14/bin/llvm-symbolizer
fi

case "$mode" in
  replay)
    files=()
    for d in "$corpus" "${4:-}"; do
      [ -n "$d" ] && [ -d "$d" ] || continue
      while IFS= read -r -d '' f; do files+=("$f"); done < <(find "$d" -type f ! -name '.*' -print0 | sort -z)
    done
    if [ ${#files[@]} -eq 0 ]; then echo "fuzz $name: no inputs to replay"; exit 1; fi
    "$bin" "${common[@]}" "${files[@]}" >"${TMPDIR:-/tmp}/fuzz_${name}_replay.$$.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
      cat "${TMPDIR:-/tmp}/fuzz_${name}_replay.$$.log"; rm -f "${TMPDIR:-/tmp}/fuzz_${name}_replay.$$.log"
      echo "fuzz $name: replaying the committed inputs FAILED (exit $rc)"; exit 1
    fi
    rm -f "${TMPDIR:-/tmp}/fuzz_${name}_replay.$$.log"
    echo "fuzz $name: ${#files[@]} committed inputs replayed, all pass"
    ;;
  runs|time)
    amount=${4:?runs or seconds}
    work=${5:?work directory}
    if [ "$mode" = runs ]; then
      rm -rf "$work"
      how=(-seed=1 -runs="$amount")
    else
      # Fork mode goes on after a finding, so one run collects every distinct finding it meets.
      how=(-max_total_time="$amount" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
    fi
    mkdir -p "$work/corpus"
    touch "$work/.started"
    start=$(date +%s)
    "$bin" "${common[@]}" "${how[@]}" -artifact_prefix="$work/" "$work/corpus" "$corpus" >"$work/log.txt" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    inputs=$(grep -E '^stat::number_of_executed_units' "$work/log.txt" | awk '{print $2}' | tail -1)
    [ -n "$inputs" ] || inputs=$(grep -oE '^#[0-9]+' "$work/log.txt" | tail -1 | tr -d '#')
    mapfile -t found < <(find "$work" -maxdepth 1 -newer "$work/.started" \
                           \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | sort)
    if [ $rc -ne 0 ] || [ ${#found[@]} -gt 0 ]; then
      [ "$mode" = runs ] && tail -n 60 "$work/log.txt"
      echo "fuzz $name: ${#found[@]} FINDING(S) in ${secs} s (exit $rc; log: $work/log.txt)"
      for f in "${found[@]}"; do echo "  replay: $bin $f"; done
      echo "  once fixed, commit each input: cp <input> $here/regressions/$name/<what-it-was>"
      exit 1
    fi
    echo "fuzz $name: ${inputs:-?} inputs in ${secs} s, no finding ($(ls "$work/corpus" | wc -l) inputs in $work/corpus)"
    ;;
  *) echo "run.sh: unknown mode '$mode' (replay, runs or time)" >&2; exit 2 ;;
esac
