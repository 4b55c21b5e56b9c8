#!/usr/bin/env bash
# usage: scripts/mpirun.sh -np N BINARY [ARGS...]      (any mpirun arguments)
# Open MPI's mpirun with what a course machine needs, so that the READMEs' run lines work as printed:
#   --oversubscribe       more ranks than cores is fine (-np 4 on a 2-core laptop: the ranks share cores;
#                         without it Open MPI stops with "not enough slots")
#   --allow-run-as-root   only for root (e.g. in a container), which Open MPI refuses otherwise; the two
#                         OMPI_ALLOW_RUN_AS_ROOT* variables say the same to Open MPI 5
# The tests launch through this script too (tests/cli/mpi_launch.cmake). MPIRUN=/path/to/mpirun picks
# another launcher than the first mpirun on PATH.
set -eu
args=(--oversubscribe)
if [ "$(id -u)" = 0 ]; then
  args+=(--allow-run-as-root)
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
exec "${MPIRUN:-mpirun}" "${args[@]}" "$@"
