# The mpirun launcher and environment shared by the mpirun tests (ep_tests.cmake, phi_tiny_ep_tests.cmake).
# Not a *_tests.cmake file, so tests/CMakeLists.txt does not include it by itself.
#  _mpirun              the launcher the READMEs print, scripts/mpirun.sh (CMake's mpiexec through MPIRUN):
#                       --oversubscribe (more ranks than cores is fine), --allow-run-as-root for root (CI
#                       containers run as root); the cmake -P scripts pass the same two flags themselves
#  _ep_env              Containers often forbid the cross-process memory attach (CMA) Open MPI's shared-memory
#                       transport uses; EPLAB_COMM_TIMEOUT_S bounds a hung exchange
#  _ep_props(name ...)  the mini-model fixture and that environment, plus any further test properties, and
#                       a session directory of the test's own: Open MPI 4.1 creates and removes
#                       /tmp/ompi.<host>.<uid> around every mpiexec, and two starting together under
#                       `ctest -j` can fail ("mkdir ... File exists", orte_init failed) before our code runs
#                       (Open MPI 5 reads the PRTE_MCA_ name of the same setting)
#  _ep_gpu(name min_gpus regex cmd...)   a GPU test (label gpu) run through ep_gpu_or_skip.sh, which skips
#                       it (exit 77) on a machine with fewer than min_gpus GPUs; else it must exit 0 and print
#                       regex (expect_pass.cmake; regex "" = exit code only)
set(_mpirun bash ${EPLAB_SOURCE_DIR}/scripts/mpirun.sh)
set(_ep_env "MPIRUN=${MPIEXEC_EXECUTABLE};OMPI_MCA_btl_vader_single_copy_mechanism=none;EPLAB_COMM_TIMEOUT_S=30")
function(_ep_props name)
  set(tmp ${CMAKE_BINARY_DIR}/ompi-sessions/${name})
  file(MAKE_DIRECTORY ${tmp})
  set_tests_properties(${name} PROPERTIES FIXTURES_REQUIRED eplab_mini_model
                       ENVIRONMENT "${_ep_env};OMPI_MCA_orte_tmpdir_base=${tmp};PRTE_MCA_prte_tmpdir_base=${tmp}" ${ARGN})
endfunction()
set(_ep_skip bash ${EPLAB_SOURCE_DIR}/tests/cli/ep_gpu_or_skip.sh $<TARGET_FILE:has_gpu>)
function(_ep_gpu name min_gpus regex)
  eplab_pass_wrapper(wrap "${regex}" 0)
  add_test(NAME ${name} COMMAND ${_ep_skip} ${min_gpus} ${wrap} ${ARGN})
  # RUN_SERIAL: each test holds the GPUs; under `ctest -j` they would share them with other tests.
  set_tests_properties(${name} PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 TIMEOUT 600 RUN_SERIAL ON)
  _ep_props(${name})
endfunction()
