# A text prompt on the default model: the generated model ships a tokenizer.json (the course's small tokenizer,
# copied in by make_model), so chapter 05 encodes --prompt TEXT with no --tokenizer flag, and the greedy tokens
# are the same for every EP size:
#   mpirun -np 1|2|4 05_phi_tiny_ep --device cpu --prompt "The capital of France is" --max-new-tokens 8
# This file is both the test's definition (included by tests/CMakeLists.txt) and, run with cmake -P, the test
# itself: each run must exit 0 and print CHECK PASS (its own comparison with the single-process model), use the
# model's own tokenizer.json, and write the same prompt ids and generated ids to --json as the run with one rank.
if(CMAKE_SCRIPT_MODE_FILE)
  # cmake -DMPIRUN=... -DBIN=... -DMODEL=... -DOUT=dir -P prompt_tests.cmake
  set(prompt "The capital of France is")
  set(first_prompt "")
  set(first_ids "")
  foreach(np 1 2 4)
    set(json ${OUT}/prompt_np${np}.json)
    file(REMOVE ${json})
    execute_process(COMMAND ${MPIRUN} --oversubscribe --allow-run-as-root -np ${np} ${BIN} --model ${MODEL}
                            --device cpu --prompt "${prompt}" --max-new-tokens 8 --json ${json}
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 110)
    if(NOT rc EQUAL 0 OR NOT out MATCHES "CHECK PASS 05_phi_tiny_ep: N=${np}")
      message(FATAL_ERROR "mpirun -np ${np}: exit ${rc}, no CHECK PASS\n${out}\n${err}")
    endif()
    if(NOT out MATCHES "tokenizer [^\n]*/tokenizer.json")
      message(FATAL_ERROR "mpirun -np ${np}: the run does not name the model's tokenizer.json\n${out}")
    endif()
    file(READ ${json} j)
    string(JSON pass GET "${j}" pass)
    string(JSON pids GET "${j}" prompt_ids)
    string(JSON ids GET "${j}" generated_ids)
    string(REGEX REPLACE "[ \n]" "" pids "${pids}")
    string(REGEX REPLACE "[ \n]" "" ids "${ids}")
    message(STATUS "N=${np}: prompt ${pids} -> generated ${ids}")
    if(NOT pass)
      message(FATAL_ERROR "mpirun -np ${np}: --json says pass = ${pass}")
    endif()
    if(pids STREQUAL "[[]]" OR ids STREQUAL "[[]]")
      message(FATAL_ERROR "mpirun -np ${np}: empty prompt or no generated token (${pids} -> ${ids})")
    endif()
    if(np EQUAL 1)
      set(first_prompt "${pids}")
      set(first_ids "${ids}")
    elseif(NOT pids STREQUAL first_prompt OR NOT ids STREQUAL first_ids)
      message(FATAL_ERROR "N=${np} gives prompt ${pids} -> ${ids}; one rank gave ${first_prompt} -> ${first_ids}")
    endif()
  endforeach()
  message(STATUS "same tokens for EP sizes 1, 2 and 4: ${first_ids}")
  return()
endif()

if(NOT TARGET 05_phi_tiny_ep OR NOT MPIEXEC_EXECUTABLE)
  return()
endif()
include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)  # _ep_props: the mini-model fixture, Open MPI settings
set(_prompt_dir ${CMAKE_CURRENT_BINARY_DIR}/prompt)
file(MAKE_DIRECTORY ${_prompt_dir})
add_test(NAME prompt_default_model_same_tokens
         COMMAND ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=$<TARGET_FILE:05_phi_tiny_ep>
                 -DMODEL=${EPLAB_TEST_MODEL} -DOUT=${_prompt_dir} -P ${CMAKE_CURRENT_LIST_FILE})
set_tests_properties(prompt_default_model_same_tokens PROPERTIES LABELS cli)
_ep_props(prompt_default_model_same_tokens TIMEOUT 400)
