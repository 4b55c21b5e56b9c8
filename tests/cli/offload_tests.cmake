# Chapter 07 (offload the experts over PCIe, or EP: the gamma model). Host only: the overview of every card,
# one card per token count (the note's DeepSeek-R1 example finished: gamma = 1 at 307200 tokens with PCIe Gen5
# and 400 Gb/s InfiniBand), a model directory, --json; bad input: one "error:" line, exit 2.
if(NOT TARGET 07_offload_vs_ep)
  return()
endif()
set(_of $<TARGET_FILE:07_offload_vs_ep>)
set(_ofd --data ${EPLAB_SOURCE_DIR}/data)

eplab_expect_pass(NAME offload_overview REGEX "deepseek-r1 +400 Gb/s InfiniBand +9600 .*CHECK PASS 07_offload_vs_ep: 5 cards"
                  COMMAND ${_of} ${_ofd})
eplab_expect_pass(NAME offload_deepseek_r1
                  REGEX "S_E = 44.04 M params.*gamma = 1 at N_t = 307200 .*CHECK PASS 07_offload_vs_ep: deepseek-r1, 4 token counts"
                  COMMAND ${_of} ${_ofd} --card deepseek-r1 --tokens 1,64,4096,262144)
eplab_expect_pass(NAME offload_nvlink REGEX "gamma = 1 at N_t = 2.76 M"
                  COMMAND ${_of} ${_ofd} --card deepseek-r1 --b-net 450e9)
eplab_expect_pass(NAME offload_latency_and_base REGEX "latency 10.0 us per expert transfer.*CHECK PASS"
                  COMMAND ${_of} ${_ofd} --card mixtral-8x7b --pcie-latency-us 10 --net-latency-us 20
                          --peak-tflops 785 --hbm-gbps 4228 --json ${CMAKE_CURRENT_BINARY_DIR}/offload.json)
eplab_expect_pass(NAME offload_model_dir REGEX "MoE layers L = [0-9]+ .*CHECK PASS 07_offload_vs_ep"
                  COMMAND ${_of} --model ${EPLAB_TEST_MODEL})
set_tests_properties(offload_model_dir PROPERTIES FIXTURES_REQUIRED eplab_mini_model)

eplab_expect_error(NAME offload_unknown_card REGEX "unknown --card 'gpt-5': use one of deepseek-r1"
                   COMMAND ${_of} ${_ofd} --card gpt-5)
eplab_expect_error(NAME offload_zero_bandwidth REGEX "--b-pcie and --b-net must be > 0"
                   COMMAND ${_of} ${_ofd} --card mixtral-8x7b --b-pcie 0)
eplab_expect_error(NAME offload_negative_bandwidth REGEX "--b-pcie and --b-net must be > 0"
                   COMMAND ${_of} ${_ofd} --card mixtral-8x7b --b-net -5)
eplab_expect_error(NAME offload_zero_tokens REGEX "--tokens must be whole numbers >= 1, got 0"
                   COMMAND ${_of} ${_ofd} --card mixtral-8x7b --tokens 1,0)
eplab_expect_error(NAME offload_card_and_model REGEX "--card and --model: give one of them"
                   COMMAND ${_of} ${_ofd} --card mixtral-8x7b --model ${EPLAB_SOURCE_DIR}/data/phi-tiny-moe)
eplab_expect_error(NAME offload_trace_without_model REGEX "--trace goes with --model"
                   COMMAND ${_of} ${_ofd} --card mixtral-8x7b --trace x.jsonl)
eplab_expect_error(NAME offload_no_data REGEX "model card deepseek-r1: cannot open"
                   COMMAND ${_of} --data ${CMAKE_CURRENT_BINARY_DIR}/no-such-data --card deepseek-r1)
eplab_expect_error(NAME offload_model_without_config REGEX "no config.json there"
                   COMMAND ${_of} --model ${CMAKE_CURRENT_BINARY_DIR}/no-such-model)
eplab_expect_error(NAME offload_overview_flags REGEX "--b-pcie goes with --card or --model"
                   COMMAND ${_of} ${_ofd} --b-pcie 32e9)
# the measured N_ue from chapter 05's routing: the trace load_balancing_tests.cmake makes (fixture lb_trace) on
# the test model; a model the trace does not belong to is refused
if(TEST load_balancing_make_trace)
  set(_of_trace ${CMAKE_CURRENT_BINARY_DIR}/load_balancing_trace.jsonl)
  eplab_expect_pass(NAME offload_measured_used_experts REGEX "N_ue \\(measured\\).*\n1 +2 +2\\.0 .*CHECK PASS"
                    COMMAND ${_of} --model ${EPLAB_TEST_MODEL} --trace ${_of_trace} --tokens 1,4)
  eplab_expect_error(NAME offload_trace_of_another_model REGEX "not .*phi-tiny-moe \\(16 experts, hidden 4096"
                     COMMAND ${_of} --model ${EPLAB_SOURCE_DIR}/data/phi-tiny-moe --trace ${_of_trace})
  set_tests_properties(offload_measured_used_experts offload_trace_of_another_model
                       PROPERTIES FIXTURES_REQUIRED "eplab_mini_model;lb_trace")
endif()
