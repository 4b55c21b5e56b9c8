# Chapter 06 (load balancing: measured load, EPLB, the same steps with replicas) under mpirun, CPU ranks.
#  N = 2 and 4, both starting placements, no replicas, the hierarchical policy: CHECK PASS (the outputs
#  before and after balancing match the reference and each other); --json: balancing lowers max/mean and
#  the replica counts add up (load_balancing_json.cmake); bad input: one "error:" line, non-zero exit on
#  every rank, no hang.
if(NOT TARGET 06_load_balancing OR NOT MPIEXEC_EXECUTABLE)
  return()
endif()

set(_lb $<TARGET_FILE:06_load_balancing>)
include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)  # _mpirun, _ep_props
# 16 tokens x 2 steps per rank: enough rows for the skew to show, a second or so per run
# (CLI11 refuses a flag given twice: the --tokens / --steps tests start from _lbm0)
set(_lbm0 --model ${EPLAB_TEST_MODEL} --device cpu)
set(_lbm ${_lbm0} --tokens 16 --steps 2)

# --- passes: the default (one replica per rank) on 2 and 4 ranks, both starting maps
eplab_expect_pass(NAME load_balancing_np2 REGEX "CHECK PASS 06_load_balancing: N=2 CPU/MPI, 16 -> 18 slots"
                  COMMAND ${_mpirun} -np 2 ${_lb} ${_lbm})
_ep_props(load_balancing_np2 TIMEOUT 120)
foreach(pl linear round-robin)
  eplab_expect_pass(NAME load_balancing_np4_${pl} REGEX "CHECK PASS 06_load_balancing: N=4 CPU/MPI, 16 -> 20 slots"
                    COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --placement ${pl})
  _ep_props(load_balancing_np4_${pl} TIMEOUT 120)
endforeach()
# no replicas: EPLB may only move experts between ranks (S = E)
eplab_expect_pass(NAME load_balancing_np4_no_redundant
                  REGEX "CHECK PASS 06_load_balancing: N=4 CPU/MPI, 16 -> 16 slots"
                  COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --redundant 0)
_ep_props(load_balancing_np4_no_redundant TIMEOUT 120)
# 4 groups on 2 nodes: EPLB's hierarchical policy (groups % nodes == 0)
eplab_expect_pass(NAME load_balancing_np4_hierarchical
                  REGEX "CHECK PASS 06_load_balancing: N=4 CPU/MPI, 16 -> 20 slots"
                  COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --groups 4 --nodes 2)
_ep_props(load_balancing_np4_hierarchical TIMEOUT 120)
# --json: max/mean falls, every expert keeps a slot, the slots add up (a regex cannot compare numbers)
add_test(NAME load_balancing_json_balance_improves
         COMMAND ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=${_lb} -DMODEL=${EPLAB_TEST_MODEL} -DNP=4
                 -DOUT=${CMAKE_CURRENT_BINARY_DIR}/load_balancing.json
                 -P ${EPLAB_SOURCE_DIR}/tests/cli/load_balancing_json.cmake)
set_tests_properties(load_balancing_json_balance_improves PROPERTIES LABELS cli)
_ep_props(load_balancing_json_balance_improves TIMEOUT 120)

# --- failures: a clear "error:" line; "[on all N ranks]" says every rank stopped on it
eplab_expect_error(NAME load_balancing_one_rank REGEX "run with mpirun -np 2 or more"
                   COMMAND ${_mpirun} -np 1 ${_lb} ${_lbm})
eplab_expect_error(NAME load_balancing_redundant_uneven
                   REGEX "17 slots do not split evenly over 4 ranks \\(try --redundant 4\\) \\[on all 4 ranks\\]"
                   COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --redundant 1)
eplab_expect_error(NAME load_balancing_bad_groups
                   REGEX "16 experts do not split into --groups 3 \\[on all 4 ranks\\]"
                   COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --groups 3)
eplab_expect_error(NAME load_balancing_bad_nodes
                   REGEX "4 ranks do not split evenly over --nodes 3 \\[on all 4 ranks\\]"
                   COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --nodes 3)
eplab_expect_error(NAME load_balancing_negative_skew REGEX "--skew must be >= 0, got -1 \\[on all 4 ranks\\]"
                   COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --skew -1)
eplab_expect_error(NAME load_balancing_zero_steps REGEX "--steps must be >= 1, got 0 \\[on all 4 ranks\\]"
                   COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm0} --tokens 16 --steps 0)
eplab_expect_error(NAME load_balancing_zero_tokens REGEX "--tokens must be >= 1, got 0 \\[on all 4 ranks\\]"
                   COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm0} --tokens 0 --steps 2)
eplab_expect_error(NAME load_balancing_unknown_flag REGEX "--frobnicate.*\\[on all 4 ranks\\]"
                   COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --frobnicate)
eplab_expect_error(NAME load_balancing_missing_model REGEX "does not exist.*\\[on all 2 ranks\\]"
                   COMMAND ${_mpirun} -np 2 ${_lb} --model ${CMAKE_CURRENT_BINARY_DIR}/no-such-model --device cpu)
# more hot experts than the layer has, a negative replica count
eplab_expect_error(NAME load_balancing_too_many_hot REGEX "--hot 99 must be between 0 and the number of experts"
                   COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --hot 99)
eplab_expect_error(NAME load_balancing_negative_redundant REGEX "--redundant must be >= 0, got -1"
                   COMMAND ${_mpirun} -np 2 ${_lb} ${_lbm} --redundant -1)
foreach(t one_rank redundant_uneven bad_groups bad_nodes negative_skew zero_steps zero_tokens unknown_flag
        missing_model too_many_hot negative_redundant)
  _ep_props(load_balancing_${t} TIMEOUT 60)
endforeach()

# --- rebalancing while running: three windows, a weight move after each of the first two (the second finds
#     the map already balanced and moves nothing); the outputs of every window must agree
eplab_expect_pass(NAME load_balancing_three_windows
                  REGEX "window 0: .*weights moved in .*window 1: [^\n]*slowest rank\\): 0 experts sent between ranks.*outputs bit-identical in every window.*CHECK PASS 06_load_balancing: N=4"
                  COMMAND ${_mpirun} -np 4 ${_lb} ${_lbm} --windows 3)
_ep_props(load_balancing_three_windows TIMEOUT 120)

# --- a real run's load: chapter 05 writes a trace on CPU ranks, chapter 06 plans every layer from it
if(TARGET 05_phi_tiny_ep)
  set(_lb_trace ${CMAKE_CURRENT_BINARY_DIR}/load_balancing_trace.jsonl)
  add_test(NAME load_balancing_make_trace
           COMMAND ${_mpirun} -np 2 $<TARGET_FILE:05_phi_tiny_ep> --model ${EPLAB_TEST_MODEL} --device cpu
                   --prompt-ids 1,450,4996,17354 --prompt-ids 7,8,9 --max-new-tokens 6 --trace ${_lb_trace})
  # (_ep_props sets FIXTURES_REQUIRED to the mini model: the trace fixture is added after it, not before)
  _ep_props(load_balancing_make_trace TIMEOUT 120 FIXTURES_SETUP lb_trace)
  eplab_expect_pass(NAME load_balancing_from_trace
                    REGEX "load from the trace: 6 steps, [0-9]+ layers, 16 experts; 2 GPUs, 18 slots.*CHECK PASS 06_load_balancing --trace"
                    COMMAND ${_mpirun} -np 1 ${_lb} --trace ${_lb_trace})
  eplab_expect_pass(NAME load_balancing_from_trace_4gpus
                    REGEX "4 GPUs, 24 slots \\(8 redundant\\).*CHECK PASS 06_load_balancing --trace"
                    COMMAND ${_mpirun} -np 1 ${_lb} --trace ${_lb_trace} --gpus 4 --redundant 8)
  eplab_expect_error(NAME load_balancing_trace_gpus_uneven REGEX "--gpus 3 must divide the trace's 16 experts"
                     COMMAND ${_mpirun} -np 1 ${_lb} --trace ${_lb_trace} --gpus 3)
  foreach(t from_trace from_trace_4gpus trace_gpus_uneven)
    _ep_props(load_balancing_${t} TIMEOUT 60)  # the mini-model fixture; then the trace's, with it
    set_tests_properties(load_balancing_${t} PROPERTIES FIXTURES_REQUIRED "eplab_mini_model;lb_trace")
  endforeach()
endif()
eplab_expect_error(NAME load_balancing_trace_missing REGEX "--trace .*no-such-trace.jsonl: cannot open the file"
                   COMMAND ${_mpirun} -np 1 ${_lb} --trace ${CMAKE_CURRENT_BINARY_DIR}/no-such-trace.jsonl)
eplab_expect_error(NAME load_balancing_gpus_without_trace REGEX "--gpus goes with --trace"
                   COMMAND ${_mpirun} -np 2 ${_lb} ${_lbm} --gpus 4)
foreach(t trace_missing gpus_without_trace)
  _ep_props(load_balancing_${t} TIMEOUT 60)
endforeach()

# --- GPU: NCCL ranks, the engine with replicas (label gpu; skipped, exit 77, on a machine with fewer than 2 GPUs;
#     tests/gpu/test_ep_loopback.cu runs the engine with replicas on loopback ranks on one GPU)
_ep_gpu(load_balancing_gpu_np2 2 "CHECK PASS 06_load_balancing: N=2 GPU/NCCL"
        ${_mpirun} -np 2 ${_lb} --model ${EPLAB_TEST_MODEL} --device gpu --tokens 256 --steps 2)
# a trace whose first line routed nothing (and says no expert count): planned from the lines that did
eplab_expect_pass(NAME load_balancing_trace_first_step_empty
                  REGEX "load from the trace: 1 steps, 2 layers, 8 experts; 2 GPUs.*CHECK PASS 06_load_balancing --trace"
                  COMMAND ${_mpirun} -np 1 ${_lb} --trace ${EPLAB_SOURCE_DIR}/tests/data/traces/first_step_empty.jsonl
                          --gpus 2)
_ep_props(load_balancing_trace_first_step_empty TIMEOUT 60)
