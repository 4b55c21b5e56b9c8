# Thin wrapper: the real build is CMake. Two commands for a student: `make demo` and `make test`.
#   make demo   builds only what chapters 00-02 need (make_model, 00, 01, 02; a few minutes on a laptop),
#               makes the default model and runs the three chapters, chapter 00 on data/'s real
#               Phi-tiny-MoE metadata
#   make test   builds everything (every kernel, chapter, test and the visualizer) and runs the tests, then
#               the hostile-input passes CI runs (fuzz/README.md): test-fuzz (every fuzz target on its committed
#               seeds and regressions, then a short fixed-seed fuzzing run) and test-sanitize (the host tests again,
#               built with AddressSanitizer + UndefinedBehaviorSanitizer)
#   make fuzz   fuzzes each target for FUZZ_SECONDS (default 60; clang's libFuzzer), findings in build-fuzz/
BUILD   ?= build
JOBS    ?= $(shell nproc)
CMAKE_FLAGS ?=
MODEL   ?= data/mini
# The hostile-input builds: one build directory each (fuzz/README.md).
FUZZ_BUILD   ?= build-fuzz
FUZZ_CXX     ?= clang++-14
FUZZ_SECONDS ?= 60
SAN_BUILD    ?= build-asan
SANITIZE     ?= address,undefined
# The sanitizer pass compiles device code to PTX only (no GPU runs it there: ctest -LE gpu), which saves nvcc's
# machine-code step. Leaks are checked in every binary but those that start Open MPI and the GL app
# (fuzz/no_leak_check.cpp); protect_shadow_gap=0 lets the CUDA runtime map its memory where a GPU is present.
SAN_ENV = ASAN_OPTIONS=protect_shadow_gap=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PATH := /usr/local/cuda/bin:$(PATH)

DEMO_TARGETS = make_model 00_model_tour 01_moe_naive 02_moe_grouped

.PHONY: setup configure build demo-build model demo test test-build fuzz-build fuzz test-fuzz \
        sanitize-build test-sanitize clean
# One cmake --build at a time in $(BUILD), also under `make -j`.
.NOTPARALLEL:

setup:
	@bash scripts/setup.sh

configure: setup
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

demo-build: configure
	@cmake --build $(BUILD) -j $(JOBS) --target $(DEMO_TARGETS)

# The default synthetic model ("mini" preset, with the course's small tokenizer): every chapter and test uses
# it unless --model says otherwise. Made again when config.json or tokenizer.json is missing.
model: demo-build
	@test -f $(MODEL)/config.json -a -f $(MODEL)/tokenizer.json || \
	  $(BUILD)/tools/make_model --preset mini --out $(MODEL)

demo: model
	$(BUILD)/chapters/00_model_tour/00_model_tour --model data/phi-tiny-moe
	$(BUILD)/chapters/01_moe_naive/01_moe_naive
	$(BUILD)/chapters/02_moe_grouped/02_moe_grouped

test: test-build test-fuzz test-sanitize

test-build: build model
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# libFuzzer targets (fuzz/*_fuzz.cpp) over eplab_common, built by clang with ASan + UBSan; no CUDA.
fuzz-build: setup
	@cmake -S . -B $(FUZZ_BUILD) -DEPLAB_FUZZ=ON -DCMAKE_CXX_COMPILER=$(FUZZ_CXX) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) --target eplab_fuzzers

# Each target for FUZZ_SECONDS, from its seeds plus what earlier runs found (kept in $(FUZZ_BUILD)/fuzz-work).
fuzz: fuzz-build
	@fail=0; for bin in $(FUZZ_BUILD)/fuzz/fuzz_*; do \
	  name=$$(basename $$bin); name=$${name#fuzz_}; \
	  bash fuzz/run.sh time $$bin fuzz/corpus/$$name $(FUZZ_SECONDS) $(FUZZ_BUILD)/fuzz-work/$$name || fail=1; \
	done; exit $$fail

# What CI runs: the committed seeds and regressions once each, then a fixed number of fuzzed inputs per target.
test-fuzz: fuzz-build
	cd $(FUZZ_BUILD) && ctest -L fuzz --output-on-failure -j $(JOBS)

# The whole tree with the sanitizers on its host code; the tests that need no GPU run on it.
sanitize-build: setup
	@cmake -S . -B $(SAN_BUILD) -DEPLAB_SANITIZE=$(SANITIZE) -DCMAKE_CUDA_ARCHITECTURES=90-virtual \
	  -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(SAN_BUILD) -j $(JOBS)

test-sanitize: sanitize-build
	cd $(SAN_BUILD) && $(SAN_ENV) ctest -LE gpu --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD) $(FUZZ_BUILD) $(SAN_BUILD) data/mini
