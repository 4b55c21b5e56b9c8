# Runs the command after "--"; passes only if it exits non-zero, does not crash (no signal), and its
# stderr has exactly one line matching REGEX that starts with "error:".
include(${CMAKE_CURRENT_LIST_DIR}/command_after_dashes.cmake)  # -> cmd
execute_process(COMMAND ${cmd} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 100)
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit, got 0\nstdout:\n${out}\nstderr:\n${err}")
endif()
if(NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "expected a clean non-zero exit, got '${rc}' (crash or timeout)\nstderr:\n${err}")
endif()
if(NOT err MATCHES "error: ")
  message(FATAL_ERROR "stderr has no 'error: ' line\nstderr:\n${err}")
endif()
if(REGEX AND NOT err MATCHES "${REGEX}")
  message(FATAL_ERROR "stderr does not match '${REGEX}'\nstderr:\n${err}")
endif()
message(STATUS "exit ${rc}: ${err}")
