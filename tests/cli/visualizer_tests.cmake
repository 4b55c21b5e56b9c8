# The visualizer. Headless part (always, no GL): follow mode on a growing trace, the trace writer,
# `viz_routing` (the live routing as text) and CPU vs GPU live routing (label gpu). GL app (when Dear ImGui /
# GLFW / OpenGL / stb are there, find_deps.cmake): its --help, --print-routing (and that it prints exactly
# what viz_routing prints) and, under Xvfb, real windows, real OpenGL (Mesa), screenshots checked by
# viz_png_check (size, every panel drew, heat-map colours present) and bad input (missing model,
# unreadable / truncated / non-JSON trace, bad flags): one "error:" line, non-zero exit, no crash.
if(NOT EXISTS ${EPLAB_SOURCE_DIR}/visualizer/CMakeLists.txt)
  return()
endif()
if(NOT DEFINED EPLAB_TEST_MODEL)
  set(EPLAB_TEST_MODEL ${CMAKE_BINARY_DIR}/test-models/mini)
endif()
set(_dir ${CMAKE_CURRENT_BINARY_DIR}/visualizer)
file(MAKE_DIRECTORY ${_dir})
set(_m --model ${EPLAB_TEST_MODEL})
set(_prompt "Expert parallelism sends every token to the GPU that holds its experts")
# the prompt is 18 tokens under the mini model's tokenizer.json (the course's small tokenizer, data/tokenizer)
set(_ntok 18)
math(EXPR _last_tok "${_ntok} - 1")

# ---- Headless (viz_core tools: no GL, no display) ----

# A trace written from the CPU routing of the mini model (also the input of the GL trace screenshot below).
eplab_expect_pass(NAME viz_make_trace REGEX "wrote 20 lines" LABELS visualizer
                  COMMAND $<TARGET_FILE:viz_make_trace> ${_m} --out ${_dir}/trace.jsonl --steps 5 --ep-size 4
                          --placement round-robin)
set_tests_properties(viz_make_trace PROPERTIES FIXTURES_REQUIRED eplab_mini_model FIXTURES_SETUP viz_trace)

# Follow mode: a trace that grows while it is read (lines cut mid-way), a bad line, a rewritten file.
eplab_expect_pass(NAME viz_follow_mode REGEX "CHECK PASS viz_follow_test" LABELS visualizer
                  COMMAND $<TARGET_FILE:viz_follow_test> ${_m} --out ${_dir}/follow.jsonl)
set_tests_properties(viz_follow_mode PROPERTIES FIXTURES_REQUIRED eplab_mini_model)

# Live routing as text: viz_routing runs the same print_routing (routing_cli.hpp) as `visualizer --print-routing`.
set(_routing $<TARGET_FILE:viz_routing>)
set(_routing_re "routing on CPU[^\n]*\n[^\n]*layer 1, ${_ntok} tokens x 16 experts, top-2[^\n]*\ntoken 0 [^ ]+ experts \\[[0-9]+, [0-9]+\\] weights \\[[01]\\.[0-9][0-9], [01]\\.[0-9][0-9]\\]\n(.*\n)*token ${_last_tok} ")
eplab_expect_pass(NAME viz_routing_print_cpu REGEX "${_routing_re}" LABELS visualizer
                  COMMAND ${_routing} ${_m} --prompt ${_prompt} --layer 1 --device cpu)
set_tests_properties(viz_routing_print_cpu PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
eplab_expect_pass(NAME viz_routing_help REGEX "--device" LABELS visualizer COMMAND ${_routing} --help)
eplab_expect_error(NAME viz_routing_bad_layer REGEX "--layer 9 is out of range" LABELS visualizer
                   COMMAND ${_routing} ${_m} --layer 9 --device cpu)
set_tests_properties(viz_routing_bad_layer PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
eplab_expect_error(NAME viz_routing_missing_model REGEX "does not exist" LABELS visualizer
                   COMMAND ${_routing} --model /nonexistent/model --device cpu)

# compare_routing.cmake runs two --print-routing style runs (A, B) and compares them token by token.
set(_cmp ${CMAKE_COMMAND} -DMODEL=${EPLAB_TEST_MODEL} "-DPROMPT=${_prompt}")
set(_cmp_script -P ${EPLAB_SOURCE_DIR}/visualizer/compare_routing.cmake)
# The comparer itself: passes on two identical runs, and must fail (exit 1, CMake's FATAL_ERROR) on two
# different routings (layers 0, 1).
eplab_expect_pass(NAME viz_compare_routing_same REGEX "CHECK PASS routing: ${_ntok} tokens" LABELS visualizer
                  COMMAND ${_cmp} -DVIZ=${_routing} -DLAYER_A=1 -DDEVICE_A=cpu -DLAYER_B=1 -DDEVICE_B=cpu ${_cmp_script})
eplab_expect_pass(NAME viz_compare_routing_rejects REGEX "MISMATCH token .*CHECK FAIL" EXIT 1 LABELS visualizer
                  COMMAND ${_cmp} -DVIZ=${_routing} -DLAYER_A=0 -DDEVICE_A=cpu -DLAYER_B=1 -DDEVICE_B=cpu ${_cmp_script})
set_tests_properties(viz_compare_routing_same viz_compare_routing_rejects PROPERTIES
                     FIXTURES_REQUIRED eplab_mini_model)
# GPU (label gpu; exit 77 = skipped without one): the kernels' routing of the prompt (viz_routing --device
# gpu: the app's live-routing code, headless, so it runs on a GPU machine without OpenGL) equals the CPU's,
# on two layers. Prints both outputs and a MISMATCH line per differing token.
foreach(_l 1 3)
  eplab_gpu_test(NAME viz_routing_gpu_vs_cpu_layer${_l} REGEX "CHECK PASS routing: ${_ntok} tokens"
                 COMMAND ${_cmp} -DVIZ=${_routing} -DLAYER_A=${_l} -DDEVICE_A=cpu -DLAYER_B=${_l} -DDEVICE_B=gpu
                         ${_cmp_script})
  set_tests_properties(viz_routing_gpu_vs_cpu_layer${_l} PROPERTIES LABELS "gpu;visualizer")
endforeach()

# ---- The GL app (built when find_deps.cmake finds everything and EPLAB_VIZ_APP is ON) ----
include(${EPLAB_SOURCE_DIR}/visualizer/find_deps.cmake)
if(EPLAB_VIZ_MISSING)
  list(JOIN EPLAB_VIZ_MISSING ", " _missing)
  message(STATUS "visualizer tests: GL app tests skipped (${_missing}); headless tests kept")
  return()
endif()
set(_viz $<TARGET_FILE:visualizer>)

eplab_expect_pass(NAME viz_help REGEX "--screenshot" LABELS visualizer COMMAND ${_viz} --help)
eplab_expect_error(NAME viz_bad_placement REGEX "--placement" LABELS visualizer COMMAND ${_viz} --placement diagonal)
eplab_expect_error(NAME viz_screenshot_not_png REGEX "--screenshot .*shot.jpg: the file is written as PNG" LABELS visualizer
                   COMMAND ${_viz} --screenshot ${CMAKE_CURRENT_BINARY_DIR}/shot.jpg)

# The app's own --print-routing (no window, no xvfb): the CPU routing, and byte for byte viz_routing's output.
eplab_expect_pass(NAME viz_print_routing_cpu REGEX "${_routing_re}" LABELS visualizer
                  COMMAND ${_viz} ${_m} --prompt ${_prompt} --layer 1 --device cpu --print-routing)
eplab_expect_pass(NAME viz_print_routing_app_vs_headless REGEX "CHECK PASS routing: ${_ntok} tokens.*identical output"
                  LABELS visualizer
                  COMMAND ${_cmp} -DVIZ=${_viz} -DARGS_A=--print-routing -DVIZ_B=${_routing} -DEXACT=ON
                          -DLAYER_A=1 -DDEVICE_A=cpu -DLAYER_B=1 -DDEVICE_B=cpu ${_cmp_script})
set_tests_properties(viz_print_routing_cpu viz_print_routing_app_vs_headless PROPERTIES
                     FIXTURES_REQUIRED eplab_mini_model)

# Windows under Xvfb (Mesa). xvfb_run.sh starts a private server per test and stops it however the test
# ends (timeouts included), so that no Xvfb outlives `make test`; the lock keeps one server at a time.
find_program(XVFB_BIN Xvfb)
if(NOT XVFB_BIN)
  message(STATUS "visualizer tests: window tests skipped (missing Xvfb; `make setup`)")
  return()
endif()
set(_check $<TARGET_FILE:viz_png_check>)
set(_x bash ${EPLAB_SOURCE_DIR}/tests/cli/xvfb_run.sh -s "-screen 0 1920x1200x24")
set(_size --width 1280 --height 800)

function(_viz_test name)
  set_tests_properties(${name} PROPERTIES LABELS "cli;visualizer" RESOURCE_LOCK xvfb TIMEOUT 120 ${ARGN})
endfunction()

# 1. Live routing of a fixed prompt on the mini model, 8 GPUs in nodes of 4: screenshot, then the checker.
eplab_expect_pass(NAME viz_screenshot REGEX "wrote .*live.png \\(1280x800"
                  COMMAND ${_x} ${_viz} ${_m} --prompt ${_prompt} --layer 1 --ep-size 8 --gpus-per-node 4
                          --screenshot ${_dir}/live.png --frames 3 ${_size})
_viz_test(viz_screenshot FIXTURES_REQUIRED eplab_mini_model FIXTURES_SETUP viz_live_png)
eplab_expect_pass(NAME viz_screenshot_check REGEX "CHECK PASS" LABELS visualizer
                  COMMAND ${_check} ${_dir}/live.png --width 1280 --height 800)
set_tests_properties(viz_screenshot_check PROPERTIES FIXTURES_REQUIRED viz_live_png)

# 2. The trace viz_make_trace wrote (above), shown with the trace's own expert map.
eplab_expect_pass(NAME viz_trace_screenshot REGEX "wrote .*trace.png \\(1280x800"
                  COMMAND ${_x} ${_viz} ${_m} --trace ${_dir}/trace.jsonl --placement trace
                          --screenshot ${_dir}/trace.png --frames 4 ${_size})
_viz_test(viz_trace_screenshot FIXTURES_SETUP viz_trace_png)
set_tests_properties(viz_trace_screenshot PROPERTIES FIXTURES_REQUIRED "eplab_mini_model;viz_trace")
eplab_expect_pass(NAME viz_trace_screenshot_check REGEX "CHECK PASS" LABELS visualizer
                  COMMAND ${_check} ${_dir}/trace.png --width 1280 --height 800 --min-anchors 2)
set_tests_properties(viz_trace_screenshot_check PROPERTIES FIXTURES_REQUIRED viz_trace_png)

# 3. Bad input. The files are written here, at configure time.
set(_good_line "{\"step\":0,\"layer\":0,\"tokens\":[1,2],\"pieces\":[\"a\",\"b\"],\"experts\":[[0,1],[2,3]],\"weights\":[[1,0.5],[1,1]],\"rank_of_expert\":[0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3],\"ep_size\":4}")
file(WRITE ${_dir}/not_json.jsonl "${_good_line}\n{\"step\":1, this is not json\n")
file(WRITE ${_dir}/truncated.jsonl "${_good_line}\n{\"step\":1,\"layer\":0,\"tokens\":[1,2],\"pieces\":[\"a\",")
file(WRITE ${_dir}/bad_field.jsonl "{\"step\":0,\"layer\":0,\"tokens\":[1],\"experts\":[[0,99]],\"weights\":[[1,1]]}\n")
file(MAKE_DIRECTORY ${_dir}/a_directory.jsonl)
set(_shot --screenshot ${_dir}/bad.png --frames 2 ${_size})
eplab_expect_error(NAME viz_missing_model REGEX "does not exist" LABELS visualizer
                   COMMAND ${_x} ${_viz} --model /nonexistent/model --screenshot ${_dir}/missing_model.png --frames 2 ${_size})
set_tests_properties(viz_missing_model PROPERTIES RESOURCE_LOCK xvfb FIXTURES_SETUP viz_missing_png)
# The checker must be able to fail: with no model, the routing, load and traffic panels stay empty.
# It must read the picture and reject it (its CHECK FAIL line, exit 1), not fail for another reason.
eplab_expect_pass(NAME viz_png_check_rejects_empty REGEX "CHECK FAIL viz_png_check" EXIT 1 LABELS visualizer
                  COMMAND ${_check} ${_dir}/missing_model.png --width 1280 --height 800)
set_tests_properties(viz_png_check_rejects_empty PROPERTIES FIXTURES_REQUIRED viz_missing_png)
eplab_expect_error(NAME viz_trace_not_json REGEX "line 2: not valid JSON" LABELS visualizer
                   COMMAND ${_x} ${_viz} ${_m} --trace ${_dir}/not_json.jsonl ${_shot})
eplab_expect_error(NAME viz_trace_truncated REGEX "line 2 is incomplete" LABELS visualizer
                   COMMAND ${_x} ${_viz} ${_m} --trace ${_dir}/truncated.jsonl ${_shot})
eplab_expect_error(NAME viz_trace_unreadable REGEX "cannot read it" LABELS visualizer
                   COMMAND ${_x} ${_viz} ${_m} --trace ${_dir}/a_directory.jsonl ${_shot})
eplab_expect_error(NAME viz_trace_missing REGEX "cannot read it" LABELS visualizer
                   COMMAND ${_x} ${_viz} ${_m} --trace ${_dir}/no_such_trace.jsonl ${_shot})
eplab_expect_error(NAME viz_trace_bad_expert REGEX "expert id 99" LABELS visualizer
                   COMMAND ${_x} ${_viz} ${_m} --trace ${_dir}/bad_field.jsonl ${_shot})
eplab_expect_error(NAME viz_bad_layer REGEX "--layer 9 is out of range" LABELS visualizer
                   COMMAND ${_x} ${_viz} ${_m} --layer 9 ${_shot})
eplab_expect_error(NAME viz_ep_too_big REGEX "--ep-size 32" LABELS visualizer
                   COMMAND ${_x} ${_viz} ${_m} --ep-size 32 ${_shot})
eplab_expect_error(NAME viz_unwritable_png REGEX "cannot write" LABELS visualizer
                   COMMAND ${_x} ${_viz} ${_m} --screenshot /nonexistent/dir/out.png --frames 1 ${_size})
set(_bad viz_trace_not_json viz_trace_truncated viz_trace_unreadable viz_trace_missing viz_trace_bad_expert
    viz_bad_layer viz_ep_too_big viz_unwritable_png)
set_tests_properties(${_bad} PROPERTIES RESOURCE_LOCK xvfb FIXTURES_REQUIRED eplab_mini_model)
