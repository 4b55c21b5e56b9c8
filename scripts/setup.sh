#!/usr/bin/env bash
# Installs the Debian packages EP Lab builds against, when they are missing and we can (root or sudo).
# The CUDA toolkit (nvcc, cuBLAS, NCCL) is expected to be installed already (it is not a Debian package here).
set -eu
pkgs=(cmake make g++ doctest-dev libcli11-dev nlohmann-json3-dev libopenmpi-dev openmpi-bin python3)
[ "${EPLAB_WITH_VISUALIZER:-1}" = 1 ] && pkgs+=(libimgui-dev libstb-dev libglfw3-dev xvfb xauth libgl1-mesa-dri fonts-dejavu-core)
# make test's hostile-input passes (fuzz/README.md): clang with libFuzzer and its sanitizer runtimes, llvm-symbolizer
# for readable reports; the sanitizer build uses g++'s own ASan/UBSan runtimes (libasan8, libubsan1 come with g++).
[ "${EPLAB_WITH_FUZZ:-1}" = 1 ] && pkgs+=(clang-14 libclang-rt-14-dev llvm-14)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then echo "setup: all Debian packages present"; exit 0; fi
echo "setup: installing ${missing[*]}"
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if [ -n "$sudo" ] && ! command -v sudo >/dev/null; then
  echo "setup: missing packages (${missing[*]}) and no root/sudo: install them by hand" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
