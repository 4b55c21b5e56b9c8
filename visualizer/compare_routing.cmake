# Runs the live routing as text twice (A and B: a device and a layer each) and compares the per-token
# lines "token i → experts [a, b] weights [x, y]". VIZ is `viz_routing` (headless) or `visualizer` (then pass
# -DARGS_A=--print-routing); VIZ_B (default VIZ) and ARGS_B run B, so the app can be checked against viz_routing:
#   expert ids   identical, choice by choice;
#   multipliers  equal to 2 decimals, allowing 0.01 (one unit of the printed last digit): both backends get
#                the same bf16 input and gate, but cuBLAS and the CPU loop sum the logits in a different fp32
#                order (~1e-6 apart), which can move a multiplier across a rounding boundary such as 0.125.
# Each run's header prints its smallest routing margin: if ids differ on a token and that margin is below
# ~1e-5, it is a near-tie that summation order can flip, not a routing bug.
# -DEXACT=ON: besides, the two outputs must be identical byte for byte (same code, same device).
#
#   cmake -DVIZ=path/to/viz_routing -DMODEL=dir -DPROMPT=text -DLAYER_A=1 -DDEVICE_A=cpu
#         -DLAYER_B=1 -DDEVICE_B=gpu [-DVIZ_B=path/to/visualizer -DARGS_B=--print-routing] [-DEXACT=ON]
#         -P compare_routing.cmake
foreach(v VIZ MODEL PROMPT LAYER_A DEVICE_A LAYER_B DEVICE_B)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "compare_routing.cmake: -D${v}=... is required")
  endif()
endforeach()

if(NOT DEFINED VIZ_B)
  set(VIZ_B ${VIZ})
endif()

function(run_viz tag viz layer device extra out_lines out_text)
  get_filename_component(name ${viz} NAME)
  execute_process(COMMAND ${viz} --model ${MODEL} --prompt ${PROMPT} --layer ${layer} --device ${device} ${extra}
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  message("---- ${tag}: ${name} --layer ${layer} --device ${device} ${extra} (exit ${rc})\n${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "CHECK FAIL: ${tag} (--device ${device}) exited with ${rc}: ${err}")
  endif()
  string(REGEX MATCHALL "token [0-9]+ [^\n]*" lines "${out}")
  list(LENGTH lines n)
  if(n EQUAL 0)
    message(FATAL_ERROR "CHECK FAIL: ${tag} printed no 'token i ...' lines")
  endif()
  set(${out_lines} "${lines}" PARENT_SCOPE)
  set(${out_text} "${out}" PARENT_SCOPE)
endfunction()

run_viz(A ${VIZ} ${LAYER_A} ${DEVICE_A} "${ARGS_A}" a_lines a_text)
run_viz(B ${VIZ_B} ${LAYER_B} ${DEVICE_B} "${ARGS_B}" b_lines b_text)
list(LENGTH a_lines na)
list(LENGTH b_lines nb)
if(NOT na EQUAL nb)
  message(FATAL_ERROR "CHECK FAIL: A printed ${na} tokens, B printed ${nb}")
endif()

set(_re "^token ([0-9]+) .* experts \\[([0-9, ]*)\\] weights \\[([-0-9., naife]*)\\]$")
set(bad 0)
math(EXPR last "${na} - 1")
foreach(i RANGE ${last})
  list(GET a_lines ${i} la)
  list(GET b_lines ${i} lb)
  if(NOT la MATCHES "${_re}")
    message(FATAL_ERROR "CHECK FAIL: cannot parse A's line '${la}'")
  endif()
  set(ida "${CMAKE_MATCH_2}")
  set(wa "${CMAKE_MATCH_3}")
  if(NOT lb MATCHES "${_re}")
    message(FATAL_ERROR "CHECK FAIL: cannot parse B's line '${lb}'")
  endif()
  set(idb "${CMAKE_MATCH_2}")
  set(wb "${CMAKE_MATCH_3}")
  set(why "")
  if(NOT ida STREQUAL idb)
    set(why "expert ids differ")
  else()
    string(REPLACE ", " ";" wla "${wa}")
    string(REPLACE ", " ";" wlb "${wb}")
    foreach(x y IN ZIP_LISTS wla wlb)
      if(NOT x MATCHES "^[0-9]+\\.[0-9][0-9]$" OR NOT y MATCHES "^[0-9]+\\.[0-9][0-9]$")
        set(why "weights are not numbers with 2 decimals ('${x}' vs '${y}')")
        break()
      endif()
      # hundredths as integers ("0.61" -> 61), no leading zeros for math()
      string(REPLACE "." "" xi "${x}")
      string(REPLACE "." "" yi "${y}")
      string(REGEX REPLACE "^0+([0-9])" "\\1" xi "${xi}")
      string(REGEX REPLACE "^0+([0-9])" "\\1" yi "${yi}")
      math(EXPR d "${xi} - ${yi}")
      if(d GREATER 1 OR d LESS -1)
        set(why "multipliers differ by more than 0.01 (${x} vs ${y})")
        break()
      endif()
    endforeach()
  endif()
  if(why)
    math(EXPR bad "${bad} + 1")
    message("MISMATCH token ${i}: ${why}\n  A (${DEVICE_A}): ${la}\n  B (${DEVICE_B}): ${lb}")
  endif()
endforeach()
if(bad GREATER 0)
  message(FATAL_ERROR "CHECK FAIL: ${bad} of ${na} tokens differ between A (${DEVICE_A}) and B (${DEVICE_B}); "
                      "see MISMATCH lines above and each run's smallest routing margin in its header")
endif()
set(exact "")
if(EXACT)
  if(NOT a_text STREQUAL b_text)
    message(FATAL_ERROR "CHECK FAIL: the outputs of A (${VIZ}) and B (${VIZ_B}) are not identical (see above)")
  endif()
  set(exact ", identical output")
endif()
message("CHECK PASS routing: ${na} tokens, ${DEVICE_A} layer ${LAYER_A} == ${DEVICE_B} layer ${LAYER_B} "
        "(ids identical, multipliers within 0.01${exact})")
