# Thin wrapper: the real build is CMake. Two commands for a student: `make demo` and `make test`.
BUILD   ?= build
JOBS    ?= $(shell nproc)
CMAKE_FLAGS ?=
export PATH := /usr/local/cuda/bin:$(PATH)

.PHONY: setup configure build model demo test bench clean

setup:
	@bash scripts/setup.sh

configure: setup
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

# The default synthetic model ("mini" preset): every chapter and test uses it unless --model says otherwise.
model: build
	@test -f models/mini/config.json || $(BUILD)/tools/make_model --preset mini --out models/mini

demo: model
	$(BUILD)/chapters/00_model_tour/00_model_tour
	$(BUILD)/chapters/01_moe_naive/01_moe_naive
	$(BUILD)/chapters/02_moe_grouped/02_moe_grouped

test: model
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD) models
