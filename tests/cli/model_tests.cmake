# Model loading end to end, through the real binaries (included by tests/CMakeLists.txt).
#
# Fixtures (ctest runs them first, even under -R): the mini model every CLI test uses (eplab_mini_model,
# tests/CMakeLists.txt) and, here, a second mini model and a small model in <build>/test-models/;
# make_bad_checkpoint copies the small one and breaks it in one way per kind. Then 00_model_tour must fail
# on each broken copy with one "error: ..." line naming what is wrong, and pass (CHECK PASS) on the good
# models, on a metadata-only model (config + index, no shards) and on data/'s real Phi-tiny-MoE metadata.
set(EPLAB_TEST_MODELS ${CMAKE_BINARY_DIR}/test-models)
set(EPLAB_TOUR $<TARGET_FILE:00_model_tour>)
set(EPLAB_MAKE_MODEL $<TARGET_FILE:make_model>)

# --- good models -------------------------------------------------------------------------------------
add_test(NAME model_make_mini_again
         COMMAND make_model --preset mini --seed 1 --threads 1 --out ${EPLAB_TEST_MODELS}/mini-again)
add_test(NAME model_make_small
         COMMAND make_model --preset mini --layers 2 --vocab 512 --shard-mb 1 --out ${EPLAB_TEST_MODELS}/small)
add_test(NAME model_make_metadata_only
         COMMAND make_model --preset mini --metadata-only --out ${EPLAB_TEST_MODELS}/mini-metadata)
set_tests_properties(model_make_mini_again PROPERTIES FIXTURES_SETUP model_mini_again LABELS cli)
set_tests_properties(model_make_small PROPERTIES FIXTURES_SETUP model_small LABELS cli)
set_tests_properties(model_make_metadata_only PROPERTIES FIXTURES_SETUP model_metadata_only LABELS cli)
# A model without tokenizer.json (fixture model_no_tokenizer), for the tests of what a prompt needs.
add_test(NAME model_make_no_tokenizer
         COMMAND make_model --preset mini --layers 1 --tokenizer none --out ${EPLAB_TEST_MODELS}/no-tokenizer)
set_tests_properties(model_make_no_tokenizer PROPERTIES FIXTURES_SETUP model_no_tokenizer LABELS cli)

# Same seed, different thread count -> byte-identical directories (tokenizer.json included).
add_test(NAME model_make_model_deterministic
         COMMAND diff -r ${EPLAB_TEST_MODEL} ${EPLAB_TEST_MODELS}/mini-again)
set_tests_properties(model_make_model_deterministic PROPERTIES FIXTURES_REQUIRED "eplab_mini_model;model_mini_again"
                                                               LABELS cli)
# The default model ships the course's small tokenizer, so text prompts work on it; the small model's
# vocabulary (512) is too small for it, so it has none.
add_test(NAME model_make_model_tokenizer
         COMMAND diff ${EPLAB_SOURCE_DIR}/data/tokenizer/tokenizer.json ${EPLAB_TEST_MODEL}/tokenizer.json)
set_tests_properties(model_make_model_tokenizer PROPERTIES FIXTURES_REQUIRED eplab_mini_model LABELS cli)
add_test(NAME model_make_small_no_tokenizer COMMAND bash -c "test ! -e '${EPLAB_TEST_MODELS}/small/tokenizer.json'")
set_tests_properties(model_make_small_no_tokenizer PROPERTIES FIXTURES_REQUIRED model_small LABELS cli)

eplab_expect_pass(NAME model_tour_mini REGEX "CHECK PASS 00_model_tour"
                  COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODEL} --json ${EPLAB_TEST_MODELS}/tour_mini.json)
set_tests_properties(model_tour_mini PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
eplab_expect_pass(NAME model_tour_small REGEX "CHECK PASS 00_model_tour"
                  COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODELS}/small --ep-sizes 1,3,5,16)
set_tests_properties(model_tour_small PROPERTIES FIXTURES_REQUIRED model_small)
eplab_expect_pass(NAME model_tour_help REGEX "--ep-sizes" COMMAND ${EPLAB_TOUR} --help)

# --- metadata only: config.json + index, no shards -------------------------------------------------------
# data/'s real Phi-tiny-MoE metadata: the tables from the config, 5.51 M per expert and 3.76 B in all.
eplab_expect_pass(NAME model_tour_phi_tiny_metadata
                  REGEX "weights are not present.*loaded model: 5\\.51 M parameters per expert, 3\\.76 B in all.*CHECK PASS 00_model_tour: metadata only: the index names the 1957 tensors.*total_size 7,510,440,576 bytes = 3,755,220,288 parameters x 2 bytes"
                  COMMAND ${EPLAB_TOUR} --model ${EPLAB_SOURCE_DIR}/data/phi-tiny-moe)
eplab_expect_pass(NAME model_tour_metadata_only REGEX "CHECK PASS 00_model_tour: metadata only"
                  COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODELS}/mini-metadata)
set_tests_properties(model_tour_metadata_only PROPERTIES FIXTURES_REQUIRED model_metadata_only)
# An index whose total_size disagrees with the config: CHECK FAIL (exit 1) naming both numbers.
add_test(NAME model_tour_metadata_wrong_total_size
         COMMAND bash -c "d='${EPLAB_TEST_MODELS}/metadata-wrong-size' && rm -rf \"$d\" && cp -r '${EPLAB_TEST_MODELS}/mini-metadata' \"$d\" && sed -i 's/\"total_size\": [0-9]*/\"total_size\": 12345/' \"$d/model.safetensors.index.json\" && out=$('${EPLAB_TOUR}' --model \"$d\"); rc=$?; echo \"$out\" | tail -3; [ $rc = 1 ] && echo \"$out\" | grep -q 'CHECK FAIL 00_model_tour: the index.s metadata.total_size is 12,345 bytes, the config implies'")
set_tests_properties(model_tour_metadata_wrong_total_size PROPERTIES FIXTURES_REQUIRED model_metadata_only LABELS cli)

# --- bad command lines -------------------------------------------------------------------------------
eplab_expect_error(NAME model_tour_unknown_flag REGEX "--bogus.*see --help" COMMAND ${EPLAB_TOUR} --bogus)
eplab_expect_error(NAME model_tour_missing_dir REGEX "model directory '.*no-such-model' does not exist"
                   COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODELS}/no-such-model)
eplab_expect_error(NAME model_tour_bad_ep_size REGEX "--ep-sizes" COMMAND ${EPLAB_TOUR} --ep-sizes 0)
eplab_expect_error(NAME model_tour_ep_size_above_experts
                   REGEX "--ep-sizes: EP size 32 is larger than the model's 16 experts per layer"
                   COMMAND ${EPLAB_TOUR} --model ${EPLAB_TEST_MODEL} --ep-sizes 1,32)
set_tests_properties(model_tour_ep_size_above_experts PROPERTIES FIXTURES_REQUIRED eplab_mini_model)
eplab_expect_error(NAME model_tour_model_is_a_file REGEX "model directory '.*README.md' is a file, not a directory"
                   COMMAND ${EPLAB_TOUR} --model ${EPLAB_SOURCE_DIR}/README.md)
eplab_expect_error(NAME model_make_model_tokenizer_too_big REGEX "has 767 ids but the model's vocab_size is 512"
                   COMMAND ${EPLAB_MAKE_MODEL} --preset mini --layers 1 --vocab 512
                           --tokenizer ${EPLAB_SOURCE_DIR}/data/tokenizer/tokenizer.json
                           --out ${EPLAB_TEST_MODELS}/tokenizer-too-big)
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
