# Thin wrapper: the real build is CMake. Two commands for a student: `make demo` and `make test`.
#   make demo   builds only what chapters 00-02 need (make_model, 00, 01, 02; a few minutes on a laptop),
#               makes the default model and runs the three chapters, chapter 00 on data/'s real
#               Phi-tiny-MoE metadata
#   make test   builds everything (every kernel, chapter, test and the visualizer) and runs the tests
BUILD   ?= build
JOBS    ?= $(shell nproc)
CMAKE_FLAGS ?=
MODEL   ?= data/mini
export PATH := /usr/local/cuda/bin:$(PATH)

DEMO_TARGETS = make_model 00_model_tour 01_moe_naive 02_moe_grouped

.PHONY: setup configure build demo-build model demo test clean
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

test: build model
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD) data/mini
