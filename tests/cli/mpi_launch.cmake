# The mpirun launcher and environment shared by the mpirun tests (ep_tests.cmake, phi_tiny_ep_tests.cmake).
# Not a *_tests.cmake file, so tests/CMakeLists.txt does not include it by itself.
#  _mpirun              the launcher: --oversubscribe (more ranks than cores is fine for tests),
#                       --allow-run-as-root (CI containers run as root)
#  _ep_env              Containers often forbid the cross-process memory attach (CMA) Open MPI's shared-memory
#                       transport uses; EPLAB_COMM_TIMEOUT_S bounds a hung exchange
#  _ep_props(name ...)  the mini-model fixture and that environment, plus any further test properties
set(_mpirun ${MPIEXEC_EXECUTABLE} --oversubscribe --allow-run-as-root)
set(_ep_env "OMPI_MCA_btl_vader_single_copy_mechanism=none;EPLAB_COMM_TIMEOUT_S=30")
function(_ep_props name)
  set_tests_properties(${name} PROPERTIES FIXTURES_REQUIRED eplab_mini_model ENVIRONMENT "${_ep_env}" ${ARGN})
endfunction()
