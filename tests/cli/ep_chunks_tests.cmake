# Chapter 04's chunked pipeline (--chunks C; kernels/ep/ep_moe_gpu.hpp, "Chunked pipeline").
#  CPU (always): bad values end every rank with one error line and a non-zero exit; the CPU (MPI) path
#  accepts --chunks with --layout inplace and ignores it (it runs inplace as permute).
#  GPU (label gpu; skipped, exit 77, with fewer GPUs than the test needs): chunks vs the CPU reference
#  (both placements, N = 1 and 2, top-4, 0 tokens, more chunks than rows, T varying per call and per rank
#  with 0 included), the same output bits as --chunks 1, and a short --bench with its timeline.
# (ep_tests.cmake has the unchunked tests; the helpers are in mpi_launch.cmake.)
if(NOT TARGET 04_expert_parallel OR NOT MPIEXEC_EXECUTABLE)
  return()
endif()

set(_ep $<TARGET_FILE:04_expert_parallel>)
set(_epc $<TARGET_FILE:ep_engine_checks>)
include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)  # _mpirun, _ep_env, _ep_props
set(_m --model ${EPLAB_TEST_MODEL})

# --- CPU: bad input
foreach(bad "zero;0" "negative;-3" "too_many;1025")
  list(GET bad 0 what)
  list(GET bad 1 value)
  eplab_expect_error(NAME ep_cpu_chunks_${what} REGEX "--chunks must be between 1 and 1024, got ${value}"
                     COMMAND ${_mpirun} -np 2 ${_ep} ${_m} --device cpu --layout inplace --chunks ${value})
  _ep_props(ep_cpu_chunks_${what} TIMEOUT 60)
endforeach()
eplab_expect_error(NAME ep_cpu_chunks_not_inplace REGEX "pipelines the inplace layout only"
                   COMMAND ${_mpirun} -np 2 ${_ep} ${_m} --device cpu --layout permute --chunks 4)
eplab_expect_error(NAME ep_cpu_chunks_list_outside_bench REGEX "--chunks takes one value"
                   COMMAND ${_mpirun} -np 2 ${_ep} ${_m} --device cpu --layout inplace --chunks 2 4)
foreach(t not_inplace list_outside_bench)
  _ep_props(ep_cpu_chunks_${t} TIMEOUT 60)
endforeach()
# --- CPU: accepted and ignored, the answer checked as always
eplab_expect_pass(NAME ep_cpu_chunks_ignored
                  REGEX "--chunks 4: ignored on the CPU.*CHECK PASS 04_expert_parallel: N=2 linear inplace, T=8"
                  COMMAND ${_mpirun} -np 2 ${_ep} ${_m} --device cpu --layout inplace --chunks 4 --tokens 8)
_ep_props(ep_cpu_chunks_ignored TIMEOUT 120)

# --- GPU: NCCL (_ep_gpu: mpi_launch.cmake; skipped, exit 77, with fewer GPUs than the test needs)
# every token vs the CPU reference, 4 pieces per peer message, both placements
foreach(pl linear round-robin)
  _ep_gpu(ep_gpu_np2_${pl}_inplace_chunks4 2 "CHECK PASS 04_expert_parallel: N=2 ${pl} inplace \\(4 chunks\\)"
                 ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 256 --placement ${pl} --layout inplace --chunks 4)
endforeach()
# more pieces than rows (most pieces empty, skipped on both sides), a count that divides nothing, top-4,
# no tokens at all, and one rank alone (no peer: every token is combined on the side stream)
_ep_gpu(ep_gpu_np2_inplace_chunks_beyond_rows 2 "CHECK PASS 04_expert_parallel: N=2 round-robin inplace \\(64 chunks\\)"
               ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 3 --placement round-robin --layout inplace --chunks 64)
_ep_gpu(ep_gpu_np2_inplace_chunks3_softmax_top4 2 "CHECK PASS 04_expert_parallel: N=2 linear inplace \\(3 chunks\\)"
               ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 100 --router softmax --top-k 4 --layer 2
               --layout inplace --chunks 3)
_ep_gpu(ep_gpu_np2_inplace_chunks4_zero_tokens 2 "CHECK PASS 04_expert_parallel: N=2 linear inplace \\(4 chunks\\)"
               ${_mpirun} -np 2 ${_ep} ${_m} --device gpu --tokens 0 --layout inplace --chunks 4)
_ep_gpu(ep_gpu_np1_inplace_chunks4 1 "CHECK PASS 04_expert_parallel: N=1 linear inplace \\(4 chunks\\)"
               ${_mpirun} -np 1 ${_ep} ${_m} --device gpu --tokens 64 --layout inplace --chunks 4)
_ep_gpu(ep_gpu_np1_inplace_chunks3_softmax_top4 1 "CHECK PASS 04_expert_parallel: N=1 linear inplace \\(3 chunks\\)"
               ${_mpirun} -np 1 ${_ep} ${_m} --device gpu --tokens 100 --router softmax --top-k 4 --layer 2
               --layout inplace --chunks 3)
# the engine with T changing every call and per rank (0 on one rank and on all), two layers sharing one
# workspace (and its piece events); then the most pieces allowed, so that most calls have empty pieces
_ep_gpu(ep_gpu_np2_vary_inplace_chunks4 2 "CHECK PASS ep_engine_checks --vary: N=2 round-robin inplace, chunks 4,"
               ${_mpirun} -np 2 ${_epc} ${_m} --device gpu --vary --placement round-robin --layout inplace --chunks 4)
_ep_gpu(ep_gpu_np2_vary_inplace_chunks_max 2 "CHECK PASS ep_engine_checks --vary: N=2 linear inplace, chunks 1024,"
               ${_mpirun} -np 2 ${_epc} ${_m} --device gpu --vary --placement linear --layout inplace --chunks 1024)
# the same output bits as --chunks 1 (checksums of the gathered output; two --chunks 1 runs first prove
# that the GPU output is reproducible at all)
_ep_gpu(ep_gpu_np2_chunks_same_bits 2 ""
               ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=${_ep} -DMODEL=${EPLAB_TEST_MODEL}
               -P ${EPLAB_SOURCE_DIR}/tests/cli/ep_chunks_same_output.cmake)
# a short benchmark with chunks 1 and 4: checks its output, prints the timeline (the chunked one has a mark more)
_ep_gpu(ep_gpu_np2_bench_chunks 2 "local tokens combined \\(side\\).*CHECK PASS 04_expert_parallel --bench"
               ${_mpirun} -np 2 ${_ep} --bench --bench-tokens 128 1024 --bench-iters 3 --chunks 1 4)
