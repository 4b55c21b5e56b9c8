# Chapter 04's chunked pipeline must give the same output BITS as the unchunked flow: the pieces change
# when rows move, never what they hold, and the split combine computes every token whole, with the same
# fp32 order (kernels/ep/ep_moe_gpu.cu, "Chunked pipeline"). Each run prints the FNV-1a checksum of the
# whole gathered output; all must agree with --chunks 1 of the same placement. Two --chunks 1 runs come
# first: if they differ, the GPU path is not reproducible run to run and this test says so instead of
# blaming the chunks. (Placements are not compared with each other: other GEMM groupings, other roundings.)
# cmake -DMPIRUN=... -DBIN=... -DMODEL=... -P ep_chunks_same_output.cmake      (2 GPUs)
function(run_once pl chunks out_var)
  execute_process(COMMAND ${MPIRUN} --oversubscribe --allow-run-as-root -np 2 ${BIN} --model ${MODEL} --device gpu
                          --tokens 1000 --layout inplace --placement ${pl} --chunks ${chunks} --show 0
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 200)
  if(NOT rc EQUAL 0 OR NOT out MATCHES "CHECK PASS")
    message(FATAL_ERROR "run ${pl} --chunks ${chunks} failed (exit ${rc})\n${out}\n${err}")
  endif()
  string(REGEX MATCH "fnv1a64=[0-9a-f]+" sum "${out}")
  if(sum STREQUAL "")
    message(FATAL_ERROR "run ${pl} --chunks ${chunks} printed no checksum\n${out}")
  endif()
  message(STATUS "${pl}, --chunks ${chunks}: ${sum}")
  set(${out_var} "${sum}" PARENT_SCOPE)
endfunction()

foreach(case "linear;2;4;7;64" "round-robin;3")
  list(POP_FRONT case pl)
  run_once(${pl} 1 ref)
  run_once(${pl} 1 again)
  if(NOT again STREQUAL ref)
    message(FATAL_ERROR "${pl}: two identical --chunks 1 runs differ (${ref} vs ${again}): the GPU output is not "
                        "reproducible run to run, so bit equality with --chunks cannot be tested this way")
  endif()
  foreach(c IN LISTS case)
    run_once(${pl} ${c} sum)
    if(NOT sum STREQUAL ref)
      message(FATAL_ERROR "${pl}: --chunks ${c} gives ${sum}, --chunks 1 gives ${ref}: the chunked pipeline changed "
                          "the output bits (pieces or split combine)")
    endif()
  endforeach()
  message(STATUS "${pl}: --chunks ${case} give the same bits as --chunks 1 (${ref})")
endforeach()
