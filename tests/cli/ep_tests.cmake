# Chapter 04 (expert parallelism) under mpirun.
#  CPU (always): N = 1..4 ranks x linear / round-robin placement (and the direct layout) must print
#  CHECK PASS; the output must not depend on N, placement or layout; bad set-ups and a dying rank must
#  end every rank with a non-zero exit and no hang.
#  GPU (label gpu): NCCL on 1 and 2 GPUs, the NCCL failure path and a short --bench; skipped (exit 77)
#  on machines with fewer GPUs than the test needs.
if(NOT TARGET 04_expert_parallel OR NOT MPIEXEC_EXECUTABLE)
  return()
endif()

set(_ep $<TARGET_FILE:04_expert_parallel>)
set(_epc $<TARGET_FILE:ep_engine_checks>)  # tests/mpi: --vary, --fail-rank, --stall-rank
include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)  # _mpirun, _ep_env, _ep_props
set(_m --model ${EPLAB_TEST_MODEL})
set(EPLAB_TEST_MODEL_ARG "--model ${EPLAB_TEST_MODEL}")

# --- the CPU path: every N, both placements; the direct layout too
foreach(np 1 2 3 4)
  foreach(pl linear round-robin)
    eplab_expect_pass(NAME ep_cpu_np${np}_${pl} REGEX "CHECK PASS 04_expert_parallel: N=${np} ${pl} permute"
                      COMMAND ${_mpirun} -np ${np} ${_ep} ${_m} --device cpu --tokens 8 --placement ${pl})
    _ep_props(ep_cpu_np${np}_${pl} TIMEOUT 120)
  endforeach()
  eplab_expect_pass(NAME ep_cpu_np${np}_direct REGEX "CHECK PASS 04_expert_parallel: N=${np} round-robin direct"
                    COMMAND ${_mpirun} -np ${np} ${_ep} ${_m} --device cpu --tokens 8 --placement round-robin
                            --layout direct)
  _ep_props(ep_cpu_np${np}_direct TIMEOUT 120)
endforeach()
# uneven split (16 experts on 3 ranks) is accepted the vLLM way, says so, prints the map, and passes its check
eplab_expect_pass(NAME ep_cpu_uneven_map
                  REGEX "uneven: rank 0 holds 6, the others 5\\)\n  rank 0: experts 0 1 2 3 4 5\n  rank 1: experts 6 7 8 9 10\n  rank 2: experts 11 12 13 14 15\n.*CHECK PASS 04_expert_parallel: N=3 linear permute, T=4 per rank"
                  COMMAND ${_mpirun} -np 3 ${_ep} ${_m} --device cpu --tokens 4)
_ep_props(ep_cpu_uneven_map TIMEOUT 120)
# empty batches and another layer, softmax top-4 routing
eplab_expect_pass(NAME ep_cpu_zero_tokens REGEX "CHECK PASS"
                  COMMAND ${_mpirun} -np 2 ${_ep} ${_m} --device cpu --tokens 0)
_ep_props(ep_cpu_zero_tokens TIMEOUT 120)
eplab_expect_pass(NAME ep_cpu_softmax_top4 REGEX "CHECK PASS"
                  COMMAND ${_mpirun} -np 3 ${_ep} ${_m} --device cpu --tokens 6 --router softmax --top-k 4 --layer 1
                          --placement round-robin)
_ep_props(ep_cpu_softmax_top4 TIMEOUT 120)
# --json is written and names the verdict
eplab_expect_pass(NAME ep_cpu_json COMMAND ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=${_ep}
                  -DMODEL=${EPLAB_TEST_MODEL} -DOUT=${CMAKE_CURRENT_BINARY_DIR}/ep_cpu.json
                  -P ${EPLAB_SOURCE_DIR}/tests/cli/ep_json.cmake)
_ep_props(ep_cpu_json TIMEOUT 120)

# --- the answer does not depend on N, placement or layout (one global batch of 24 tokens)
add_test(NAME ep_cpu_same_output_any_n
         COMMAND ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=${_ep} -DMODEL=${EPLAB_TEST_MODEL}
                 -P ${EPLAB_SOURCE_DIR}/tests/cli/ep_same_output.cmake)
set_tests_properties(ep_cpu_same_output_any_n PROPERTIES LABELS cli)
_ep_props(ep_cpu_same_output_any_n TIMEOUT 300)

# --- failures: a clear "error:" line, a non-zero exit on every rank, no hang
eplab_expect_error(NAME ep_cpu_more_ranks_than_experts REGEX "17 ranks but the layer has only 16 experts"
                   COMMAND ${_mpirun} -np 17 ${_ep} ${_m} --device cpu)
eplab_expect_error(NAME ep_cpu_unknown_flag REGEX "--frobnicate"
                   COMMAND ${_mpirun} -np 2 ${_ep} ${_m} --device cpu --frobnicate)
eplab_expect_error(NAME ep_cpu_bad_placement REGEX "--placement"
                   COMMAND ${_mpirun} -np 2 ${_ep} ${_m} --device cpu --placement random)
eplab_expect_error(NAME ep_cpu_rank_exits_early REGEX "exiting early on purpose"
                   COMMAND ${_mpirun} -np 3 ${_epc} ${_m} --device cpu --fail-rank 1)
eplab_expect_error(NAME ep_cpu_ranks_disagree REGEX "tokens is 5 but rank 0's is 4"
                   COMMAND ${_mpirun} -np 1 ${_ep} ${_m} --device cpu --tokens 4 : -np 1 ${_ep} ${_m} --device cpu
                           --tokens 5)
# a batch the host cannot hold: one line, not std::bad_alloc (1e9 tokens x 256 values, far beyond any RAM)
eplab_expect_error(NAME ep_cpu_out_of_host_memory REGEX "out of host memory"
                   COMMAND ${_mpirun} -np 2 ${_ep} ${_m} --device cpu --tokens 1000000000)
eplab_expect_error(NAME ep_cpu_tokens_overflow REGEX "more tokens than one batch can index"
                   COMMAND ${_mpirun} -np 3 ${_ep} ${_m} --device cpu --tokens 1000000000)
eplab_expect_error(NAME ep_cpu_missing_model REGEX "does not exist"
                   COMMAND ${_mpirun} -np 2 ${_ep} --model ${CMAKE_CURRENT_BINARY_DIR}/no-such-model --device cpu)
foreach(t more_ranks_than_experts unknown_flag bad_placement rank_exits_early ranks_disagree missing_model
        out_of_host_memory tokens_overflow)
  _ep_props(ep_cpu_${t} TIMEOUT 60)
endforeach()

# --- GPU: NCCL (_ep_gpu: mpi_launch.cmake; skipped, exit 77, with fewer GPUs than the test needs)
_ep_gpu(ep_gpu_np1 1 "CHECK PASS 04_expert_parallel: N=1"
        ${_mpirun} -np 1 ${_ep} ${_m} --device gpu --tokens 64)
foreach(pl linear round-robin)
  foreach(lay permute direct)
    _ep_gpu(ep_gpu_np2_${pl}_${lay} 2 "CHECK PASS 04_expert_parallel: N=2 ${pl} ${lay}"
            ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 256 --placement ${pl} --layout ${lay})
  endforeach()
endforeach()
# the inplace layout (kernels/ep/ep_moe_gpu.hpp: experts on the arrival buffer, own rows outside NCCL)
foreach(pl linear round-robin)
  _ep_gpu(ep_gpu_np2_${pl}_inplace 2 "CHECK PASS 04_expert_parallel: N=2 ${pl} inplace"
          ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 256 --placement ${pl} --layout inplace)
endforeach()
_ep_gpu(ep_gpu_np1_inplace 1 "CHECK PASS 04_expert_parallel: N=1 linear inplace"
        ${_mpirun} -np 1 ${_ep} ${_m} --device gpu --tokens 64 --layout inplace)
_ep_gpu(ep_gpu_np2_inplace_softmax_top4 2 "CHECK PASS 04_expert_parallel: N=2"
        ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 100 --router softmax --top-k 4 --layer 2 --layout inplace)
# top-4 on one GPU: the engine's combine for a top-k other than 2 (its general path) runs on a 1-GPU machine too
_ep_gpu(ep_gpu_np1_inplace_softmax_top4 1 "CHECK PASS 04_expert_parallel: N=1 linear inplace"
        ${_mpirun} -np 1 ${_ep} ${_m} --device gpu --tokens 100 --router softmax --top-k 4 --layer 2 --layout inplace)
# the engine EpMoeGpu with T changing every call, different per rank, 0 on one rank and on all, growing
# past 4096 rows and shrinking again, two layers sharing one workspace: every token vs the CPU reference
foreach(lay inplace permute direct)
  _ep_gpu(ep_gpu_np2_vary_${lay} 2 "CHECK PASS ep_engine_checks --vary: N=2 round-robin ${lay}"
          ${_mpirun} -np 2 ${_epc} ${_m} --device gpu --vary --placement round-robin --layout ${lay})
endforeach()
_ep_gpu(ep_gpu_np1_vary 1 "CHECK PASS ep_engine_checks --vary: N=1 linear inplace"
        ${_mpirun} -np 1 ${_epc} ${_m} --device gpu --vary --layout inplace)
_ep_gpu(ep_gpu_np2_small 2 "CHECK PASS 04_expert_parallel: N=2"
        ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 3 --placement round-robin)
_ep_gpu(ep_gpu_np2_zero_tokens 2 "CHECK PASS 04_expert_parallel: N=2"
        ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 0)
_ep_gpu(ep_gpu_np2_softmax_top4 2 "CHECK PASS 04_expert_parallel: N=2"
        ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 100 --router softmax --top-k 4 --layer 2)
# a dying rank under NCCL: every rank ends, non-zero, well inside the timeout
_ep_gpu(ep_gpu_np2_rank_exits_early 2 ""
        ${CMAKE_COMMAND} -DREGEX=exiting.early.on.purpose -P ${EPLAB_SOURCE_DIR}/tests/cli/expect_error.cmake --
        ${_mpirun} -np 2 ${_epc} ${_m} --device gpu --fail-rank 1)
set_tests_properties(ep_gpu_np2_rank_exits_early PROPERTIES TIMEOUT 60)
# one rank more than this node has GPUs: a clear error (on every rank), no hang
_ep_gpu(ep_gpu_more_ranks_than_gpus 1 ""
        bash -c "${CMAKE_COMMAND} -DREGEX=NCCL.expert.parallelism.needs.one.GPU.per.rank -P ${EPLAB_SOURCE_DIR}/tests/cli/expect_error.cmake -- ${MPIEXEC_EXECUTABLE} --oversubscribe --allow-run-as-root -np $((EPLAB_GPUS+1)) ${_ep} ${EPLAB_TEST_MODEL_ARG} --device gpu")
set_tests_properties(ep_gpu_more_ranks_than_gpus PROPERTIES TIMEOUT 60)
# a short benchmark (Phi-tiny shape, random weights) checks its own output before timing
_ep_gpu(ep_gpu_np2_bench 2 "CHECK PASS 04_expert_parallel --bench"
        ${_mpirun} -np 2 ${_ep} --bench --bench-tokens 128 1024 --bench-iters 3)
# a rank that hangs (not dies) under NCCL: the host-side watchdog ends every rank within the timeout
_ep_gpu(ep_gpu_np2_rank_stalls 2 ""
        ${CMAKE_COMMAND} -DREGEX=watchdog -P ${EPLAB_SOURCE_DIR}/tests/cli/expect_error.cmake --
        ${_mpirun} -np 2 ${_epc} ${_m} --device gpu --stall-rank 1)
set_tests_properties(ep_gpu_np2_rank_stalls PROPERTIES TIMEOUT 90)
