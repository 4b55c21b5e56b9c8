# Finds what the visualizer's GL app needs (all Debian packages). Sets EPLAB_VIZ_MISSING to the list of
# what is missing (empty when everything is there); the app (`visualizer`) and `viz_png_check` are built only
# when it is empty. The headless part (viz_core, viz_routing, viz_make_trace, viz_follow_test) needs none of
# this and is always built. Included by visualizer/CMakeLists.txt and by tests/cli/visualizer_tests.cmake
# (which runs first, before the targets exist). No include_guard: imported targets (glfw, OpenGL::GL) are
# per directory, so each includer finds them again.
#
# -DEPLAB_VIZ_APP=OFF skips the app even when everything is installed (to check the headless build).
# Besides Debian's own paths, each CMAKE_PREFIX_PATH entry is searched the same way (Debian packages
# unpacked under a prefix, e.g. CMAKE_PREFIX_PATH=/tmp/deps/usr: include/imgui, share/doc/libimgui-dev/...).
option(EPLAB_VIZ_APP "build the visualizer's GL app (needs Dear ImGui, GLFW, OpenGL, stb)" ON)
set(EPLAB_VIZ_MISSING)
if(NOT EPLAB_VIZ_APP)
  set(EPLAB_VIZ_MISSING "EPLAB_VIZ_APP=OFF")
  return()
endif()

set(_viz_prefixes ${CMAKE_PREFIX_PATH} $ENV{CMAKE_PREFIX_PATH})
string(REPLACE ":" ";" _viz_prefixes "${_viz_prefixes}")
set(_viz_imgui_inc)
set(_viz_imgui_backends)
set(_viz_stb_inc)
foreach(p ${_viz_prefixes} /usr)
  list(APPEND _viz_imgui_inc ${p}/include/imgui)
  list(APPEND _viz_imgui_backends ${p}/share/doc/libimgui-dev/examples/backends ${p}/share/imgui/backends)
  list(APPEND _viz_stb_inc ${p}/include/stb)
endforeach()
# NO_DEFAULT_PATH: only these folders, so a stray imgui.h / stb header elsewhere is never picked up.
find_path(IMGUI_INCLUDE_DIR imgui.h PATHS ${_viz_imgui_inc} NO_DEFAULT_PATH)
find_library(IMGUI_LIBRARY imgui)
find_path(IMGUI_BACKEND_SRC_DIR imgui_impl_glfw.cpp PATHS ${_viz_imgui_backends} NO_DEFAULT_PATH)
find_package(glfw3 QUIET)
set(OpenGL_GL_PREFERENCE GLVND)
find_package(OpenGL QUIET)
find_path(STB_INCLUDE_DIR stb_image_write.h PATHS ${_viz_stb_inc} NO_DEFAULT_PATH)
find_library(STB_LIBRARY stb)

foreach(v IMGUI_INCLUDE_DIR IMGUI_LIBRARY IMGUI_BACKEND_SRC_DIR STB_INCLUDE_DIR STB_LIBRARY)
  if(NOT ${v})
    list(APPEND EPLAB_VIZ_MISSING ${v})
  endif()
endforeach()
if(NOT glfw3_FOUND)
  list(APPEND EPLAB_VIZ_MISSING glfw3)
endif()
if(NOT OpenGL_FOUND)
  list(APPEND EPLAB_VIZ_MISSING OpenGL)
endif()
