# Chapter 05 (the whole model with expert parallelism) under mpirun: the CPU path, and the GPU path with -np 1
# and -np 2 (label gpu, skipped without enough GPUs).
#  - greedy tokens identical for EP = 1, 2, 4 and both placements (phi_tiny_ep_same_tokens.cmake compares the
#    tokens checksum across runs; every run also checks itself against the single-process model: CHECK PASS)
#  - --trace writes one JSON line per (step, layer) in the visualizer's format; --json names the verdict
#  - bad input: one "error:" line, non-zero exit on every rank, no hang
if(NOT TARGET 05_phi_tiny_ep OR NOT MPIEXEC_EXECUTABLE)
  return()
endif()

set(_p5 $<TARGET_FILE:05_phi_tiny_ep>)
include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)  # the same launcher and environment as chapter 04's
set(_p5_m --model ${EPLAB_TEST_MODEL})
set(_p5_dir ${CMAKE_CURRENT_BINARY_DIR}/phi_tiny_ep)
file(MAKE_DIRECTORY ${_p5_dir} ${_p5_dir}/gpu)
set(_p5_tok ${EPLAB_SOURCE_DIR}/tests/data/tokenizer/tokenizer.json)

function(_p5_props name)
  _ep_props(${name} TIMEOUT 120 ${ARGN})
endfunction()

# --- each EP size and placement passes its own check (same tokens as one process with every expert)
foreach(np 1 2 4)
  foreach(pl linear round-robin)
    eplab_expect_pass(NAME phi_tiny_ep_np${np}_${pl} REGEX "CHECK PASS 05_phi_tiny_ep: N=${np} ${pl}"
                      COMMAND ${_mpirun} -np ${np} ${_p5} ${_p5_m} --device cpu --prompt-ids 1,450,4996,17354
                              --prompt-ids 1,2,3 --max-new-tokens 6 --placement ${pl})
    _p5_props(phi_tiny_ep_np${np}_${pl})
  endforeach()
endforeach()
# uneven split (16 experts on 3 ranks) and a batch smaller than the EP size (ranks with no rows)
eplab_expect_pass(NAME phi_tiny_ep_np3_one_token REGEX "CHECK PASS 05_phi_tiny_ep: N=3"
                  COMMAND ${_mpirun} -np 3 ${_p5} ${_p5_m} --prompt-ids 1 --max-new-tokens 4)
_p5_props(phi_tiny_ep_np3_one_token)

# --- the tokens do not depend on the EP size or the placement (checksums compared across runs)
add_test(NAME phi_tiny_ep_same_tokens
         COMMAND ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=${_p5} -DMODEL=${EPLAB_TEST_MODEL}
                 -DTOKENIZER=${_p5_tok} -DOUT=${_p5_dir} -P ${EPLAB_SOURCE_DIR}/tests/cli/phi_tiny_ep_same_tokens.cmake)
set_tests_properties(phi_tiny_ep_same_tokens PROPERTIES LABELS cli)
_p5_props(phi_tiny_ep_same_tokens TIMEOUT 400)

# --- text prompts through the test tokenizer, --chat, --trace and --json (checked by the same script)
add_test(NAME phi_tiny_ep_trace_json
         COMMAND ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=${_p5} -DMODEL=${EPLAB_TEST_MODEL}
                 -DTOKENIZER=${_p5_tok} -DOUT=${_p5_dir} -DMODE=trace
                 -P ${EPLAB_SOURCE_DIR}/tests/cli/phi_tiny_ep_same_tokens.cmake)
set_tests_properties(phi_tiny_ep_trace_json PROPERTIES LABELS cli)
_p5_props(phi_tiny_ep_trace_json)

# --- bad input: one error line, non-zero exit on every rank, no hang
string(REPEAT "7," 4090 _p5_long)  # 4090 ids + 32 new tokens > max_position_embeddings 4096
function(_p5_error name regex)
  eplab_expect_error(NAME phi_tiny_ep_${name} REGEX "${regex}" COMMAND ${_mpirun} ${ARGN})
  _p5_props(phi_tiny_ep_${name})
endfunction()
_p5_error(missing_model "does not exist" -np 2 ${_p5} --model ${_p5_dir}/no-such-model --prompt-ids 1,2)
_p5_error(missing_tokenizer "has no tokenizer.json" -np 2 ${_p5} --model ${CMAKE_BINARY_DIR}/test-models/no-tokenizer
          --prompt Hello)
set_tests_properties(phi_tiny_ep_missing_tokenizer PROPERTIES FIXTURES_REQUIRED "eplab_mini_model;model_no_tokenizer")
_p5_error(bad_tokenizer_file "no-such-tok.json" -np 2 ${_p5} ${_p5_m} --tokenizer ${_p5_dir}/no-such-tok.json
          --prompt Hello)
_p5_error(prompt_too_long "max_position_embeddings 4096" -np 2 ${_p5} ${_p5_m} --prompt-ids ${_p5_long})
_p5_error(more_ranks_than_experts "17 ranks" -np 17 ${_p5} ${_p5_m} --prompt-ids 1,2)
_p5_error(unknown_flag "--frobnicate" -np 2 ${_p5} ${_p5_m} --prompt-ids 1,2 --frobnicate)
_p5_error(no_prompt "no prompt" -np 2 ${_p5} ${_p5_m})
_p5_error(bad_ids "not a token id" -np 2 ${_p5} ${_p5_m} --prompt-ids 1,x)
_p5_error(id_outside_vocab "outside the model's vocabulary" -np 2 ${_p5} ${_p5_m} --prompt-ids 1,99999)
_p5_error(bench_needs_gpu "--bench measures the GPU path" -np 1 ${_p5} ${_p5_m} --bench --device cpu)
_p5_error(peer_json_missing "--peer-json: cannot open" -np 1 ${_p5} ${_p5_m} --device gpu --bench
          --peer-json ${_p5_dir}/no-such-peer.json)
_p5_error(peer_json_without_bench "--peer-json goes with --bench" -np 1 ${_p5} ${_p5_m} --prompt-ids 1,2
          --peer-json ${_p5_dir}/no-such-peer.json)
# Broken checkpoints from model_tests.cmake's fixtures (make_bad_checkpoint): a shard missing, and an expert
# tensor whose shape disagrees with config.json. Expert 3 lives on rank 0 only (linear placement on 2 ranks):
# rank 1 loads fine and must still exit non-zero with a line, not wait for rank 0.
foreach(_kind missing-shard wrong-shape)
  set(_re_missing-shard "shard named by .*model.safetensors.index.json is missing")
  # both ranks' lines, in either order (the two processes write stderr independently)
  set(_w "experts.3.w2.weight' has shape .128, 256., expected .256, 128.")
  set(_s "rank 1/2.*stopping because rank 0 failed")
  set(_re_wrong-shape "(${_w}.*${_s}|${_s}.*${_w})")
  _p5_error(bad_checkpoint_${_kind} "${_re_${_kind}}" -np 2 ${_p5} --model ${EPLAB_TEST_MODELS}/bad-${_kind}
            --prompt-ids 1,2 --max-new-tokens 2)
  set_tests_properties(phi_tiny_ep_bad_checkpoint_${_kind} PROPERTIES FIXTURES_REQUIRED model_bad_${_kind})
endforeach()

# --- the GPU path: label gpu, skipped (77) without enough GPUs. -np 1: the engine's one-rank case (every expert
#     on one GPU); -np 2: EP over NCCL, one GPU per rank. Each run checks every generated token against the fp32 CPU model (CHECK PASS).
set(_p5_skip bash ${EPLAB_SOURCE_DIR}/tests/cli/ep_gpu_or_skip.sh $<TARGET_FILE:has_gpu>)
function(_p5_gpu name np)
  eplab_pass_wrapper(wrap "CHECK PASS 05_phi_tiny_ep: N=${np} gpu" 0)
  add_test(NAME phi_tiny_ep_gpu_${name} COMMAND ${_p5_skip} ${np} ${wrap} ${_mpirun} -np ${np} ${ARGN})
  set_tests_properties(phi_tiny_ep_gpu_${name} PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 RUN_SERIAL ON)
  _p5_props(phi_tiny_ep_gpu_${name} TIMEOUT 300)
endfunction()
_p5_gpu(one_prompt 1 ${_p5} ${_p5_m} --device gpu --prompt-ids 1,450,4996,17354 --max-new-tokens 16)
_p5_gpu(batch_json 1 ${_p5} ${_p5_m} --device gpu --prompt-ids 1,450,4996,17354 --prompt-ids 1,2,3 --prompt-ids 7
        --max-new-tokens 8 --json ${_p5_dir}/gpu_np1.json)
_p5_gpu(text_prompt 1 ${_p5} ${_p5_m} --device gpu --tokenizer ${_p5_tok} --prompt "Hello world" --max-new-tokens 8)
foreach(pl linear round-robin)
  _p5_gpu(np2_${pl} 2 ${_p5} ${_p5_m} --device gpu --placement ${pl} --prompt-ids 1,450,4996,17354 --prompt-ids 1,2,3
          --prompt-ids 7 --max-new-tokens 8)
endforeach()
_p5_gpu(np2_one_token 2 ${_p5} ${_p5_m} --device gpu --prompt-ids 5 --max-new-tokens 4)  # rank 1 owns no rows
# the tokens on GPUs do not depend on the EP size or the placement either
add_test(NAME phi_tiny_ep_gpu_same_tokens
         COMMAND ${_p5_skip} 2 ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=${_p5} -DMODEL=${EPLAB_TEST_MODEL}
                 -DTOKENIZER=${_p5_tok} -DOUT=${_p5_dir} -DDEVICE=gpu "-DRUNS=1 linear;2 linear;2 round-robin"
                 -P ${EPLAB_SOURCE_DIR}/tests/cli/phi_tiny_ep_same_tokens.cmake)
set_tests_properties(phi_tiny_ep_gpu_same_tokens PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 RUN_SERIAL ON)
_p5_props(phi_tiny_ep_gpu_same_tokens TIMEOUT 400)
# --trace on GPUs: the same trace format and checks as the CPU run (2 ranks, round-robin, --chat, --json)
add_test(NAME phi_tiny_ep_gpu_trace_json
         COMMAND ${_p5_skip} 2 ${CMAKE_COMMAND} -DMPIRUN=${MPIEXEC_EXECUTABLE} -DBIN=${_p5} -DMODEL=${EPLAB_TEST_MODEL}
                 -DTOKENIZER=${_p5_tok} -DOUT=${_p5_dir}/gpu -DDEVICE=gpu -DMODE=trace
                 -P ${EPLAB_SOURCE_DIR}/tests/cli/phi_tiny_ep_same_tokens.cmake)
set_tests_properties(phi_tiny_ep_gpu_trace_json PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 RUN_SERIAL ON)
_p5_props(phi_tiny_ep_gpu_trace_json)
