# Chapter 03 (experts placed by hand, one process) end to end on the mini model.
# CPU: 1..4 simulated devices x both placements, uneven splits, T edge cases, another router; bad flags.
# GPU (label gpu, skipped without one): every GPU present, one GPU, both placements, several T.
#
# The mini model comes from the fixture eplab_mini_model (tests/CMakeLists.txt). If that file ever stops
# defining it, define it here so these tests still have a model.
if(NOT DEFINED EPLAB_TEST_MODEL)
  set(EPLAB_TEST_MODEL ${CMAKE_BINARY_DIR}/test-models/mini)
endif()
if(NOT TEST make_mini_model)
  add_test(NAME make_mini_model COMMAND make_model --preset mini --out ${EPLAB_TEST_MODEL} --seed 1)
  set_tests_properties(make_mini_model PROPERTIES FIXTURES_SETUP eplab_mini_model LABELS cli)
endif()

set(_ch 03_manual_placement)
set(_bin $<TARGET_FILE:${_ch}>)
set(_m --model ${EPLAB_TEST_MODEL})
set(_needs_model)

foreach(n 1 2 3 4)
  foreach(p linear round-robin)
    eplab_expect_pass(NAME ${_ch}_cpu_n${n}_${p} REGEX "CHECK PASS 03_manual_placement: ${n} simulated"
                      COMMAND ${_bin} ${_m} --device cpu --gpus ${n} --placement ${p} --iters 1)
    list(APPEND _needs_model ${_ch}_cpu_n${n}_${p})
  endforeach()
endforeach()
# Every expert on its own device (16 = E), an uneven split with T edge cases, and softmax top-4.
eplab_expect_pass(NAME ${_ch}_cpu_n16 REGEX "CHECK PASS"
                  COMMAND ${_bin} ${_m} --device cpu --gpus 16 --placement round-robin --iters 1)
foreach(T 0 1 7 1000)
  eplab_expect_pass(NAME ${_ch}_cpu_n3_T${T} REGEX "CHECK PASS"
                    COMMAND ${_bin} ${_m} --device cpu --gpus 3 --placement round-robin --tokens ${T} --iters 1)
  list(APPEND _needs_model ${_ch}_cpu_n3_T${T})
endforeach()
eplab_expect_pass(NAME ${_ch}_cpu_softmax_top4 REGEX "CHECK PASS"
                  COMMAND ${_bin} ${_m} --device cpu --gpus 3 --router softmax --top-k 4 --layer 1 --tokens 33 --iters 1)
# The map is printed: with round-robin on 4 devices, device 1 holds experts 1 5 9 13.
eplab_expect_pass(NAME ${_ch}_cpu_prints_map REGEX "device 1: experts 1 5 9 13"
                  COMMAND ${_bin} ${_m} --device cpu --gpus 4 --placement round-robin --iters 1)
eplab_expect_pass(NAME ${_ch}_help REGEX "--placement" COMMAND ${_bin} --help)
list(APPEND _needs_model ${_ch}_cpu_n16 ${_ch}_cpu_softmax_top4 ${_ch}_cpu_prints_map)

# Bad input: one line on stderr starting with "error:", non-zero exit, no crash.
eplab_expect_error(NAME ${_ch}_unknown_flag REGEX "--frobnicate" COMMAND ${_bin} --frobnicate)
eplab_expect_error(NAME ${_ch}_gpus_0 REGEX "--gpus must be >= 1" COMMAND ${_bin} ${_m} --device cpu --gpus 0)
eplab_expect_error(NAME ${_ch}_gpus_17 REGEX "--gpus 17: the layer has only 16 experts"
                   COMMAND ${_bin} ${_m} --device cpu --gpus 17)
eplab_expect_error(NAME ${_ch}_bad_placement REGEX "--placement" COMMAND ${_bin} ${_m} --device cpu --placement foo)
eplab_expect_error(NAME ${_ch}_negative_tokens REGEX "--tokens must be >= 0"
                   COMMAND ${_bin} ${_m} --device cpu --tokens -1)
eplab_expect_error(NAME ${_ch}_bad_layer REGEX "--layer 99 is out of range" COMMAND ${_bin} ${_m} --device cpu --layer 99)
eplab_expect_error(NAME ${_ch}_missing_model REGEX "does not exist" COMMAND ${_bin} --model /nonexistent/model --device cpu)
eplab_expect_error(NAME ${_ch}_bench_on_cpu REGEX "--bench times the GPU path" COMMAND ${_bin} --device cpu --bench)
eplab_expect_error(NAME ${_ch}_share_gpu_on_cpu REGEX "--share-gpu needs a GPU" COMMAND ${_bin} --device cpu --share-gpu)
list(APPEND _needs_model ${_ch}_gpus_0 ${_ch}_gpus_17 ${_ch}_bad_placement ${_ch}_negative_tokens ${_ch}_bad_layer)

set_tests_properties(${_needs_model} PROPERTIES FIXTURES_REQUIRED eplab_mini_model)

# GPU: all GPUs present (default --gpus), one GPU, both placements, T edge cases. With one GPU present the
# first two are the same run; on a multi-GPU machine they differ.
foreach(p linear round-robin)
  foreach(T 0 1 64 1000)
    eplab_gpu_test(NAME ${_ch}_gpu_all_${p}_T${T} REGEX "CHECK PASS"
                   COMMAND ${_bin} ${_m} --device gpu --placement ${p} --tokens ${T})
  endforeach()
  eplab_gpu_test(NAME ${_ch}_gpu_one_${p} REGEX "CHECK PASS 03_manual_placement: 1 GPU"
                 COMMAND ${_bin} ${_m} --device gpu --gpus 1 --placement ${p} --tokens 333)
endforeach()
# The multi-GPU code path (layout, peer copies, per-device streams and events) on any GPU count:
# --share-gpu runs N logical devices on GPU 0, so a one-GPU machine still exercises g != 0.
foreach(n 2 3 4)
  foreach(p linear round-robin)
    eplab_gpu_test(NAME ${_ch}_gpu_share_n${n}_${p} REGEX "CHECK PASS 03_manual_placement: ${n} GPUs"
                   COMMAND ${_bin} ${_m} --device gpu --share-gpu --gpus ${n} --placement ${p} --tokens 1000)
  endforeach()
endforeach()
foreach(T 0 1 7)
  eplab_gpu_test(NAME ${_ch}_gpu_share_n3_T${T} REGEX "CHECK PASS"
                 COMMAND ${_bin} ${_m} --device gpu --share-gpu --gpus 3 --placement round-robin --tokens ${T})
endforeach()
eplab_gpu_test(NAME ${_ch}_gpu_share_n16 REGEX "CHECK PASS"
               COMMAND ${_bin} ${_m} --device gpu --share-gpu --gpus 16 --tokens 64)
eplab_gpu_test(NAME ${_ch}_gpu_softmax_top4 REGEX "CHECK PASS"
               COMMAND ${_bin} ${_m} --device gpu --router softmax --top-k 4 --tokens 333)
# More GPUs than present: a clear error, whatever the machine (64 is more than any node has).
eplab_gpu_test(NAME ${_ch}_gpu_too_many REGEX "GPU\\(s\\) present"
               COMMAND ${CMAKE_COMMAND} -DREGEX=present -P ${EPLAB_SOURCE_DIR}/tests/cli/expect_error.cmake --
                       ${_bin} ${_m} --device gpu --gpus 64)
