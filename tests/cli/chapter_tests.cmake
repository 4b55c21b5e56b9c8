# Chapters 01 and 02 end to end on the mini model: CPU always, GPU when present (label gpu).
set(_m --model ${EPLAB_TEST_MODEL})
foreach(ch 01_moe_naive 02_moe_grouped)
  set(_bin $<TARGET_FILE:${ch}>)
  foreach(T 0 1 64)
    eplab_expect_pass(NAME ${ch}_cpu_T${T} REGEX "CHECK PASS" COMMAND ${_bin} ${_m} --device cpu --tokens ${T})
    set_tests_properties(${ch}_cpu_T${T} PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
  endforeach()
  eplab_expect_pass(NAME ${ch}_cpu_softmax_top4 REGEX "CHECK PASS"
                    COMMAND ${_bin} ${_m} --device cpu --tokens 32 --router softmax --top-k 4 --layer 1)
  set_tests_properties(${ch}_cpu_softmax_top4 PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
  eplab_expect_pass(NAME ${ch}_help REGEX "--tokens" COMMAND ${_bin} --help)

  # Bad input: one line on stderr, non-zero exit.
  eplab_expect_error(NAME ${ch}_negative_tokens REGEX "--tokens must be >= 0" COMMAND ${_bin} ${_m} --device cpu --tokens -1)
  eplab_expect_error(NAME ${ch}_topk_gt_experts REGEX "larger than the number of experts"
                     COMMAND ${_bin} ${_m} --device cpu --router softmax --top-k 17)
  eplab_expect_error(NAME ${ch}_sparsemixer_k3 REGEX "sparsemixer routing picks exactly 2"
                     COMMAND ${_bin} ${_m} --device cpu --top-k 3)
  eplab_expect_error(NAME ${ch}_bad_layer REGEX "--layer 99 is out of range" COMMAND ${_bin} ${_m} --device cpu --layer 99)
  eplab_expect_error(NAME ${ch}_unknown_flag REGEX "--frobnicate" COMMAND ${_bin} --frobnicate)
  eplab_expect_error(NAME ${ch}_bad_device REGEX "--device" COMMAND ${_bin} ${_m} --device tpu)
  eplab_expect_error(NAME ${ch}_missing_model REGEX "does not exist" COMMAND ${_bin} --model /nonexistent/model --device cpu)
  foreach(t negative_tokens topk_gt_experts sparsemixer_k3 bad_layer bad_device)
    set_tests_properties(${ch}_${t} PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
  endforeach()

  foreach(T 0 1 7 64 1000)
    eplab_gpu_test(NAME ${ch}_gpu_T${T} REGEX "CHECK PASS ${ch}: T=${T} on GPU"
                   COMMAND ${_bin} ${_m} --device gpu --tokens ${T})
  endforeach()
  eplab_gpu_test(NAME ${ch}_gpu_softmax_top4 REGEX "CHECK PASS"
                 COMMAND ${_bin} ${_m} --device gpu --tokens 333 --router softmax --top-k 4)
endforeach()

# Chapter 02 on a CPU prints its lesson as CPU numbers (naive loop vs grouped steps), then its check.
set(_b02 $<TARGET_FILE:02_moe_grouped>)
eplab_expect_pass(NAME 02_moe_grouped_cpu_timing
                  REGEX "CPU naive [^\n]*, 1 thread: [0-9.]+ ms\nCPU grouped, 1 thread: [0-9.]+ ms  ->  naive/grouped = [0-9.]+x at T=64\n.*CHECK PASS 02_moe_grouped: T=64 on CPU"
                  COMMAND ${_b02} ${_m} --device cpu --tokens 64)
set_tests_properties(02_moe_grouped_cpu_timing PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
# --bench's options: a bad strategy name, or any of them without --bench, is an error on every device.
eplab_expect_error(NAME 02_moe_grouped_bench_experts_bad_name REGEX "--bench-experts: unknown expert strategy 'foo'"
                   COMMAND ${_b02} ${_m} --device cpu --bench-experts foo)
eplab_expect_error(NAME 02_moe_grouped_bench_experts_bad_name_bench
                   REGEX "--bench-experts: unknown expert strategy 'foo'"
                   COMMAND ${_b02} --device cpu --bench --bench-experts cublas-streams,foo)
eplab_expect_error(NAME 02_moe_grouped_bench_option_without_bench REGEX "--bench-experts is a --bench option"
                   COMMAND ${_b02} ${_m} --device cpu --bench-experts cublas-streams)
eplab_expect_error(NAME 02_moe_grouped_bench_on_cpu REGEX "--bench measures the GPU path" COMMAND ${_b02} --device cpu --bench)
set_tests_properties(02_moe_grouped_bench_experts_bad_name 02_moe_grouped_bench_option_without_bench PROPERTIES
                     FIXTURES_REQUIRED eplab_mini_model)
# GPU: a short --bench checks every size against the CPU reference before timing it, and says so.
eplab_gpu_test(NAME 02_moe_grouped_gpu_bench
               REGEX "check T=1000 naive \\(16 sampled rows\\): PASS.*CHECK PASS 02_moe_grouped --bench: output checked against the CPU reference before timing"
               COMMAND ${_b02} --bench --bench-tokens 1 64 1000 --bench-experts cublas-streams,cublas-padded)
