# What every chapter shares (common/util/cli.hpp) and the small tools, through the real binaries.
#  --json FILE into a folder that does not exist: one "error:" line naming the folder, before any work
#  (the message is parse_cli's, not write_json's "cannot write JSON" at the end of a run).
#  has_gpu --help: usage and exit 0.
if(NOT DEFINED EPLAB_TEST_MODEL)
  set(EPLAB_TEST_MODEL ${CMAKE_BINARY_DIR}/test-models/mini)
endif()
set(_json_missing ${CMAKE_BINARY_DIR}/no-such-folder/result.json)
set(_json_re "--json .*/no-such-folder/result.json: folder '.*/no-such-folder' does not exist")
foreach(ch 00_model_tour 01_moe_naive 02_moe_grouped 03_manual_placement)
  if(TARGET ${ch})
    eplab_expect_error(NAME ${ch}_json_missing_folder REGEX "${_json_re}"
                       COMMAND $<TARGET_FILE:${ch}> --model ${EPLAB_TEST_MODEL} --device cpu --json ${_json_missing})
    set_tests_properties(${ch}_json_missing_folder PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
  endif()
endforeach()
if(MPIEXEC_EXECUTABLE)
  include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)  # _mpirun, _ep_props
  if(TARGET 04_expert_parallel)
    eplab_expect_error(NAME 04_expert_parallel_json_missing_folder REGEX "${_json_re}"
                       COMMAND ${_mpirun} -np 2 $<TARGET_FILE:04_expert_parallel> --model ${EPLAB_TEST_MODEL}
                               --device cpu --json ${_json_missing})
    _ep_props(04_expert_parallel_json_missing_folder TIMEOUT 60)
  endif()
  if(TARGET 05_phi_tiny_ep)
    eplab_expect_error(NAME 05_phi_tiny_ep_json_missing_folder REGEX "${_json_re}"
                       COMMAND ${_mpirun} -np 2 $<TARGET_FILE:05_phi_tiny_ep> --model ${EPLAB_TEST_MODEL}
                               --device cpu --prompt-ids 1,2 --json ${_json_missing})
    _ep_props(05_phi_tiny_ep_json_missing_folder TIMEOUT 60)
  endif()
endif()

eplab_expect_pass(NAME has_gpu_help REGEX "usage: has_gpu" COMMAND $<TARGET_FILE:has_gpu> --help)
eplab_expect_error(NAME has_gpu_unknown_argument REGEX "unknown argument '--frobnicate'"
                   COMMAND $<TARGET_FILE:has_gpu> --frobnicate)
