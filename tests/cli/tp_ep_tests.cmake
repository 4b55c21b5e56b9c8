# Chapter 08 (tensor parallelism vs expert parallelism for the MoE layer) under mpirun, CPU ranks: N = 1, 2, 4
# pass (both schemes equal the reference; TP's all-reduce and EP's all-to-all-v move the bytes the formulas
# say); bad set-ups end every rank with one "error:" line and a non-zero exit.
if(NOT TARGET 08_tp_vs_ep OR NOT MPIEXEC_EXECUTABLE)
  return()
endif()
set(_tp $<TARGET_FILE:08_tp_vs_ep>)
include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)  # _mpirun, _ep_props
set(_tpm --model ${EPLAB_TEST_MODEL} --device cpu)
foreach(np 1 2 4)
  eplab_expect_pass(NAME tp_ep_cpu_np${np} REGEX "TP check: ids match.*EP check: ids match.*CHECK PASS 08_tp_vs_ep: N=${np} CPU/MPI"
                    COMMAND ${_mpirun} -np ${np} ${_tp} ${_tpm} --tokens 16)
  _ep_props(tp_ep_cpu_np${np} TIMEOUT 120)
endforeach()
# TP's all-reduce moves 2 (N-1)/N of [N T, H] fp32 per rank: N = 4, T = 16, H = 256 -> 96 KiB (the formula's
# column prints the same value, computed apart from the measured one)
eplab_expect_pass(NAME tp_ep_cpu_tp_bytes REGEX "TP \\(all-reduce\\) +[0-9.]+ [KM]iB +96.00 KiB +96.00 KiB = 2 \\(N-1\\)/N"
                  COMMAND ${_mpirun} -np 4 ${_tp} ${_tpm} --tokens 16 --router softmax --top-k 4 --layer 1)
_ep_props(tp_ep_cpu_tp_bytes TIMEOUT 120)
eplab_expect_error(NAME tp_ep_uneven REGEX "3 ranks do not divide [0-9]+ \\[on all 3 ranks\\]"
                   COMMAND ${_mpirun} -np 3 ${_tp} ${_tpm})
eplab_expect_error(NAME tp_ep_gpu_not_yet REGEX "chapter 08 runs on CPU ranks so far"
                   COMMAND ${_mpirun} -np 2 ${_tp} --model ${EPLAB_TEST_MODEL} --device gpu)
eplab_expect_error(NAME tp_ep_zero_tokens REGEX "--tokens must be >= 1, got 0"
                   COMMAND ${_mpirun} -np 2 ${_tp} ${_tpm} --tokens 0)
eplab_expect_error(NAME tp_ep_missing_model REGEX "does not exist"
                   COMMAND ${_mpirun} -np 2 ${_tp} --model ${CMAKE_CURRENT_BINARY_DIR}/no-such-model --device cpu)
foreach(t uneven gpu_not_yet zero_tokens missing_model)
  _ep_props(tp_ep_${t} TIMEOUT 60)
endforeach()
