# Chapter 04's output must not depend on the number of ranks, the placement or the exchange layout.
# One global batch of 24 tokens (N ranks x 24/N tokens each, the same rows for every N), run several ways
# on the CPU; every run must pass its own check and print the same output checksum.
# cmake -DMPIRUN=... -DBIN=... -DMODEL=... -P ep_same_output.cmake
set(runs "1 linear permute" "2 round-robin direct" "3 linear direct" "4 round-robin permute" "2 linear permute"
         "4 linear direct")
set(first "")
foreach(run IN LISTS runs)
  separate_arguments(r UNIX_COMMAND "${run}")
  list(GET r 0 np)
  list(GET r 1 pl)
  list(GET r 2 lay)
  math(EXPR T "24 / ${np}")
  execute_process(COMMAND ${MPIRUN} --oversubscribe --allow-run-as-root -np ${np} ${BIN} --model ${MODEL} --device cpu
                          --tokens ${T} --placement ${pl} --layout ${lay} --show 0
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
  if(NOT rc EQUAL 0 OR NOT out MATCHES "CHECK PASS")
    message(FATAL_ERROR "run '${run}' failed (exit ${rc})\n${out}\n${err}")
  endif()
  string(REGEX MATCH "fnv1a64=[0-9a-f]+" sum "${out}")
  message(STATUS "N=${np} ${pl} ${lay}, ${T} tokens per rank: ${sum}")
  if(first STREQUAL "")
    set(first "${sum}")
  elseif(NOT sum STREQUAL first)
    message(FATAL_ERROR "output differs: '${run}' gives ${sum}, the first run gave ${first}")
  endif()
endforeach()
message(STATUS "same output for every N, placement and layout: ${first}")
