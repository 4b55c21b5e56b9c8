# Hostile input through the real binaries (included by tests/CMakeLists.txt): config.json values checked as
# what they are, a config checked against the checkpoint it sits in, and decoded text printed safely.
#
# The broken models are copies of model_tests.cmake's small model (fixture model_small: 2 layers, 16 experts,
# hidden 256, intermediate 128) made by make_bad_checkpoint; each must be refused with one "error: ..." line
# and a non-zero exit (expect_error.cmake).
set(_hi_models ${CMAKE_BINARY_DIR}/test-models)
set(_hi_tour $<TARGET_FILE:00_model_tour>)
set(_hi_naive $<TARGET_FILE:01_moe_naive>)

# A copy of the small model broken in one way; the fixture hostile_<name> makes it (--kind and flags in ARGN).
function(_hi_model name)
  add_test(NAME hostile_make_${name}
           COMMAND make_bad_checkpoint --from ${_hi_models}/small --out ${_hi_models}/hostile-${name} ${ARGN})
  set_tests_properties(hostile_make_${name} PROPERTIES FIXTURES_REQUIRED model_small FIXTURES_SETUP hostile_${name}
                                                      LABELS cli)
endfunction()

# --- config.json values: a field written as TEXT (byte for byte) into a metadata-only copy; chapter 00, which
#     runs on metadata alone, must refuse it naming the file, the field and TEXT as written. Before these checks
#     the integer cases were truncated or wrapped (2^32 + 256 read as the model's own 256) and the real cases
#     accepted: chapter 00 passed on every one of them.
#     name             field                text                  regex after "config.json: " (a "[" must be closed in
#                                                                 its element: an open one joins the list's next elements)
set(_hi_values
    int_fraction       num_local_experts    16.5                  "field 'num_local_experts' must be an integer in \\[1, 4096\\], got 16\\.5"
    int_float_form     hidden_size          256.0                 "field 'hidden_size' must be an integer in \\[1, 65536\\], got 256\\.0"
    int_wraps_to_valid hidden_size          4294967552            "field 'hidden_size' must be an integer in \\[1, 65536\\], got 4294967552"
    int_wraps_negative num_hidden_layers    3567587328            "field 'num_hidden_layers' must be an integer in \\[1, 1024\\], got 3567587328"
    int_beyond_64_bits vocab_size           18446744073709551617  "field 'vocab_size' must be an integer in \\[1, 2097152\\], got 18446744073709551617"
    size_unbounded     num_hidden_layers    100000                "field 'num_hidden_layers' must be an integer in \\[1, 1024\\], got 100000"
    eps_zero           rms_norm_eps         0                     "field 'rms_norm_eps' must be a number in \\(0, 1\\), got 0"
    eps_negative       rms_norm_eps         -1E-5                 "field 'rms_norm_eps' must be a number in \\(0, 1\\), got -1E-5"
    theta_negative     rope_theta           -1e4                  "field 'rope_theta' must be a number in \\(0, inf\\), got -1e4"
    theta_beyond_float rope_theta           1e39                  "field 'rope_theta' = 1e39 does not fit in a 32-bit float"
    theta_beyond_double rope_theta          1e400                 "field 'rope_theta' is not a finite number .*1e400"
    jitter_one         router_jitter_noise  1.0                   "field 'router_jitter_noise' must be a number in .0, 1\\), got 1\\.0"
    bias_as_number     attention_bias       1                     "field 'attention_bias' must be true or false, got 1")
list(LENGTH _hi_values _n)
math(EXPR _last "${_n} - 1")
foreach(_i RANGE 0 ${_last} 4)
  math(EXPR _k "${_i} + 1")
  math(EXPR _t "${_i} + 2")
  math(EXPR _r "${_i} + 3")
  list(GET _hi_values ${_i} _name)
  list(GET _hi_values ${_k} _key)
  list(GET _hi_values ${_t} _text)
  list(GET _hi_values ${_r} _regex)
  _hi_model(config_${_name} --kind config-value --set ${_key}=${_text} --metadata-only)
  eplab_expect_error(NAME hostile_config_${_name} REGEX "hostile-config_${_name}/config\\.json: ${_regex}"
                     COMMAND ${_hi_tour} --model ${_hi_models}/hostile-config_${_name})
  set_tests_properties(hostile_config_${_name} PROPERTIES FIXTURES_REQUIRED hostile_config_${_name})
endforeach()

# --- the config against the checkpoint: layers and experts the index does not hold, shapes the headers do
#     not have. Chapter 01 reads one layer, so before Checkpoint::open compared the counts it ran on a config
#     claiming a third layer; chapter 00 must say the same on metadata alone.
_hi_model(layers --kind too-many-layers)
_hi_model(layers_metadata --kind too-many-layers --metadata-only)
_hi_model(experts --kind config-value --set num_local_experts=20)
_hi_model(intermediate --kind config-value --set intermediate_size=96)
set(_hi_layers_re "config\\.json: num_hidden_layers = 3 but the checkpoint holds 2 layers \\(it lacks tensor 'model\\.layers\\.2\\.block_sparse_moe\\.gate\\.weight'\\)")
eplab_expect_error(NAME hostile_layers_01 REGEX "${_hi_layers_re}"
                   COMMAND ${_hi_naive} --model ${_hi_models}/hostile-layers --device cpu)
set_tests_properties(hostile_layers_01 PROPERTIES FIXTURES_REQUIRED hostile_layers)
eplab_expect_error(NAME hostile_layers_00_metadata REGEX "${_hi_layers_re}"
                   COMMAND ${_hi_tour} --model ${_hi_models}/hostile-layers_metadata)
set_tests_properties(hostile_layers_00_metadata PROPERTIES FIXTURES_REQUIRED hostile_layers_metadata)
eplab_expect_error(NAME hostile_experts_01
                   REGEX "config\\.json: num_local_experts = 20 but the checkpoint holds 16 experts per layer \\(it lacks tensor 'model\\.layers\\.0\\.block_sparse_moe\\.experts\\.19\\.w1\\.weight'\\)"
                   COMMAND ${_hi_naive} --model ${_hi_models}/hostile-experts --device cpu)
set_tests_properties(hostile_experts_01 PROPERTIES FIXTURES_REQUIRED hostile_experts)
eplab_expect_error(NAME hostile_intermediate_01
                   REGEX "model-[0-9]+-of-[0-9]+\\.safetensors: tensor 'model\\.layers\\.0\\.block_sparse_moe\\.experts\\.0\\.w1\\.weight' has shape \\[128, 256\\], expected \\[96, 256\\]"
                   COMMAND ${_hi_naive} --model ${_hi_models}/hostile-intermediate --device cpu)
set_tests_properties(hostile_intermediate_01 PROPERTIES FIXTURES_REQUIRED hostile_intermediate)

# --- chapter 05 under mpirun: every rank refuses the layer count, and decoded control bytes are printed
#     escaped (a NUL cut the printed prompt at "the" before). Prompt ids in the course tokenizer (the mini
#     model's): 352 "▁the", 3 <0x00>, 30 <0x1B> (ESC), 13 <0x0A> (newline, kept), 12 <0x09> (tab, kept),
#     16 <0x0D> (CR).
if(NOT TARGET 05_phi_tiny_ep OR NOT MPIEXEC_EXECUTABLE)
  return()
endif()
include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)
set(_hi_p5 $<TARGET_FILE:05_phi_tiny_ep>)
eplab_expect_error(NAME hostile_layers_05 REGEX "${_hi_layers_re}"
                   COMMAND ${_mpirun} -np 2 ${_hi_p5} --model ${_hi_models}/hostile-layers --prompt-ids 1,2
                           --max-new-tokens 2)
_ep_props(hostile_layers_05 TIMEOUT 120)
set_tests_properties(hostile_layers_05 PROPERTIES FIXTURES_REQUIRED "eplab_mini_model;hostile_layers")
eplab_expect_pass(NAME hostile_print_control_bytes
                  REGEX "\\[0\\] prompt: the\\\\x00 the\\\\x1b the\n the\t the\\\\x0d\n\\[0\\] output: "
                  COMMAND ${_mpirun} -np 1 ${_hi_p5} --model ${EPLAB_TEST_MODEL} --device cpu
                          --prompt-ids 1,352,3,352,30,352,13,352,12,352,16 --max-new-tokens 2)
_ep_props(hostile_print_control_bytes TIMEOUT 120)
