# Model loading end to end, through the real binaries (included by tests/CMakeLists.txt).
#
# Fixtures (ctest runs them first, even under -R): make_model writes the mini model and a small model
# into <build>/test-models/; make_bad_checkpoint copies the small one and breaks it in one way per kind.
# Then 00_model_tour must fail on each broken copy with one "error: ..." line naming what is wrong, and
# pass (CHECK PASS) on the good model.
set(EPLAB_TEST_MODELS ${CMAKE_BINARY_DIR}/test-models)
set(EPLAB_TOUR $<TARGET_FILE:00_model_tour>)

# --- good models -------------------------------------------------------------------------------------
add_test(NAME model_make_mini COMMAND make_model --preset mini --seed 1 --out ${EPLAB_TEST_MODELS}/mini)
add_test(NAME model_make_mini_again
         COMMAND make_model --preset mini --seed 1 --threads 1 --out ${EPLAB_TEST_MODELS}/mini-again)
add_test(NAME model_make_small
         COMMAND make_model --preset mini --layers 2 --vocab 512 --shard-mb 1 --out ${EPLAB_TEST_MODELS}/small)
set_tests_properties(model_make_mini PROPERTIES FIXTURES_SETUP model_mini LABELS cli)
set_tests_properties(model_make_mini_again PROPERTIES FIXTURES_SETUP model_mini_again LABELS cli)
set_tests_properties(model_make_small PROPERTIES FIXTURES_SETUP model_small LABELS cli)

# Same seed, different thread count -> byte-identical directories.
add_test(NAME model_make_model_deterministic
         COMMAND diff -r ${EPLAB_TEST_MODELS}/mini ${EPLAB_TEST_MODELS}/mini-again)
set_tests_properties(model_make_model_deterministic PROPERTIES FIXTURES_REQUIRED "model_mini;model_mini_again"
                                                               LABELS cli)

eplab_expect_pass(NAME model_tour_mini REGEX "CHECK PASS 00_model_tour"
                  COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODELS}/mini --json ${EPLAB_TEST_MODELS}/tour_mini.json)
set_tests_properties(model_tour_mini PROPERTIES FIXTURES_REQUIRED model_mini)
eplab_expect_pass(NAME model_tour_small REGEX "CHECK PASS 00_model_tour"
                  COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODELS}/small --ep-sizes 1,3,5,32)
set_tests_properties(model_tour_small PROPERTIES FIXTURES_REQUIRED model_small)
eplab_expect_pass(NAME model_tour_help REGEX "--ep-sizes" COMMAND ${EPLAB_TOUR} --help)

# --- bad command lines -------------------------------------------------------------------------------
eplab_expect_error(NAME model_tour_unknown_flag REGEX "--bogus.*see --help" COMMAND ${EPLAB_TOUR} --bogus)
eplab_expect_error(NAME model_tour_missing_dir REGEX "model directory '.*no-such-model' does not exist"
                   COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODELS}/no-such-model)
eplab_expect_error(NAME model_tour_bad_ep_size REGEX "--ep-sizes" COMMAND ${EPLAB_TOUR} --ep-sizes 0)
eplab_expect_error(NAME model_make_model_bad_preset REGEX "--preset" COMMAND $<TARGET_FILE:make_model> --preset huge)

# --- broken checkpoints: kind, then the regex its one-line error must match -----------------------------
set(EPLAB_BAD_KINDS
    truncated          "model-[0-9]+-of-[0-9]+.safetensors: tensor '.*': data_offsets .* run past the data section .*truncated"
    lying-header       "experts.0.w1.weight': data_offsets .* hold [0-9]+ bytes but shape .* x BF16 needs [0-9]+"
    lying-offsets      "experts.0.w1.weight': data_offsets .* run past the data section"
    header-too-long    "model-[0-9]+-of-[0-9]+.safetensors: header length [0-9]+ runs past the end of the file"
    bad-json           "model-[0-9]+-of-[0-9]+.safetensors: header is not valid JSON"
    bad-dtype          "experts.0.w1.weight': unsupported dtype 'F64'"
    overlap            "tensor 'model.layers.0.block_sparse_moe.experts.0.w.\\.weight' bytes .* overlap tensor"
    missing-shard      "model-[0-9]+-of-[0-9]+.safetensors: shard named by .*model.safetensors.index.json is missing"
    wrong-expert-count "num_local_experts = 8 but the checkpoint holds expert 15"
    topk-too-big       "num_experts_per_tok .17. is larger than num_local_experts .16."
    wrong-shape        "experts.3.w2.weight' has shape .128, 256. .BF16. but config.json implies .256, 128.")
list(LENGTH EPLAB_BAD_KINDS _n)
math(EXPR _last "${_n} - 1")
foreach(_i RANGE 0 ${_last} 2)
  math(EXPR _j "${_i} + 1")
  list(GET EPLAB_BAD_KINDS ${_i} _kind)
  list(GET EPLAB_BAD_KINDS ${_j} _regex)
  add_test(NAME model_make_bad_${_kind}
           COMMAND make_bad_checkpoint --from ${EPLAB_TEST_MODELS}/small --kind ${_kind}
                   --out ${EPLAB_TEST_MODELS}/bad-${_kind})
  set_tests_properties(model_make_bad_${_kind} PROPERTIES FIXTURES_REQUIRED model_small
                                                         FIXTURES_SETUP model_bad_${_kind} LABELS cli)
  eplab_expect_error(NAME model_bad_${_kind} REGEX "${_regex}" COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODELS}/bad-${_kind})
  set_tests_properties(model_bad_${_kind} PROPERTIES FIXTURES_REQUIRED model_bad_${_kind})
endforeach()
