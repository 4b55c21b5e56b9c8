# Chapter 04's --json: written by rank 0, valid JSON, with the verdict, the map and the traffic matrix.
execute_process(COMMAND ${MPIRUN} --oversubscribe --allow-run-as-root -np 2 ${BIN} --model ${MODEL} --device cpu
                        --tokens 5 --placement round-robin --json ${OUT}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "exit ${rc}\n${out}\n${err}")
endif()
file(READ ${OUT} j)
string(JSON pass GET "${j}" pass)
string(JSON ranks GET "${j}" ranks)
string(JSON map1 GET "${j}" expert_map 1)
string(JSON t01 GET "${j}" traffic_rows 0 1)
if(NOT pass OR NOT ranks EQUAL 2 OR NOT map1 MATCHES "^\\[[ \n]*1,[ \n]*3")
  message(FATAL_ERROR "unexpected JSON (pass=${pass} ranks=${ranks} map[1]=${map1}):\n${j}")
endif()
message(STATUS "json ok: pass=${pass}, rank 1 holds ${map1}, rank 0 sends ${t01} rows to rank 1")
