# The CPU (MPI) backend's watchdog (common/dist/mpi_communicator.cpp): a rank that dies or stalls ends every
# other rank within EPLAB_COMM_TIMEOUT_S with one "error: ... watchdog: ..." line naming it, a non-zero exit and
# no hang; a wait that is long on purpose (set_long_wait) does not trip it. The hooks are ep_engine_checks'
# --stall-rank, --fail-rank and --busy-rank (tests/mpi). Each test runs with EPLAB_COMM_TIMEOUT_S=5 and a ctest
# TIMEOUT of 60 s: without the watchdog the stall tests hang until ctest kills them, and fail.
if(NOT TARGET ep_engine_checks OR NOT MPIEXEC_EXECUTABLE)
  return()
endif()

include(${EPLAB_SOURCE_DIR}/tests/cli/mpi_launch.cmake)  # _mpirun, _ep_props
set(_wd $<TARGET_FILE:ep_engine_checks> --model ${EPLAB_TEST_MODEL} --device cpu)
# _ep_props plus the short limit (appended after _ep_env's, so it wins)
function(_wd_props name)
  _ep_props(${name} TIMEOUT 60 ${ARGN})
  set_property(TEST ${name} APPEND PROPERTY ENVIRONMENT EPLAB_COMM_TIMEOUT_S=5)
endfunction()

# a rank hangs outside MPI while the others wait for it in the layer's first collective
eplab_expect_error(NAME ep_cpu_rank_stalls REGEX "watchdog: waited [0-9]+ s in [A-Za-z_() ]+ \\(MPI\\) for rank 1, which does not answer"
                   COMMAND ${_mpirun} -np 3 ${_wd} --stall-rank 1)
_wd_props(ep_cpu_rank_stalls)
# rank 0, the one that prints, is the one that hangs
eplab_expect_error(NAME ep_cpu_rank0_stalls REGEX "watchdog: waited [0-9]+ s in [A-Za-z_() ]+ \\(MPI\\) for rank 0, which does not answer"
                   COMMAND ${_mpirun} -np 2 ${_wd} --stall-rank 0)
_wd_props(ep_cpu_rank0_stalls)
# a rank hangs after its last collective: MPI_Finalize would wait for it forever; the watched final barrier does not
eplab_expect_error(NAME ep_cpu_rank_stalls_at_exit
                   REGEX "watchdog: waited [0-9]+ s in the final barrier before MPI_Finalize \\(MPI\\) for rank 1,"
                   COMMAND ${_mpirun} -np 2 ${_wd} --stall-rank 1 --stall-at exit)
_wd_props(ep_cpu_rank_stalls_at_exit)
# a rank dies and mpirun is told not to end the job for it (Open MPI 4's orte_abort_on_non_zero_status=0):
# the watchdog still ends the others and names the dead rank
eplab_expect_error(NAME ep_cpu_rank_dies_watchdog REGEX "watchdog: waited [0-9]+ s in [A-Za-z_() ]+ \\(MPI\\) for rank 1, which does not answer"
                   COMMAND ${_mpirun} -np 3 ${_wd} --fail-rank 1)
_wd_props(ep_cpu_rank_dies_watchdog)
set_property(TEST ep_cpu_rank_dies_watchdog APPEND PROPERTY ENVIRONMENT OMPI_MCA_orte_abort_on_non_zero_status=0)
# a long wait on purpose (as for rank 0's CPU reference): 8 s, past the 5 s limit, and every rank passes
eplab_expect_pass(NAME ep_cpu_long_wait REGEX "CHECK PASS ep_engine_checks --busy-rank 0: N=2"
                  COMMAND ${_mpirun} -np 2 ${_wd} --busy-rank 0 --busy-s 8)
_wd_props(ep_cpu_long_wait)
