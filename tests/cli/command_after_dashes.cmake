# Included by the wrapper scripts run with `cmake -P script.cmake -- <command...>`: sets `cmd` to the
# command after "--", one list element per argument (an argument holding ';', as in bash -c "a; b", stays one).
set(cmd)
set(seen_dashes FALSE)
math(EXPR last "${CMAKE_ARGC} - 1")
foreach(i RANGE 0 ${last})
  if(seen_dashes)
    string(REPLACE ";" "\\;" arg "${CMAKE_ARGV${i}}")
    list(APPEND cmd "${arg}")
  elseif("${CMAKE_ARGV${i}}" STREQUAL "--")
    set(seen_dashes TRUE)
  endif()
endforeach()
