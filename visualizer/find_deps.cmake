# Finds what the visualizer needs (all Debian packages). Sets EPLAB_VIZ_MISSING to the list of what is
# missing (empty when everything is there). Included by visualizer/CMakeLists.txt and by
# tests/cli/visualizer_tests.cmake (which runs first, before the targets exist). No include_guard:
# imported targets (glfw, OpenGL::GL) are per directory, so each includer finds them again.
find_path(IMGUI_INCLUDE_DIR imgui.h PATHS /usr/include/imgui NO_DEFAULT_PATH)
find_library(IMGUI_LIBRARY imgui)
find_path(IMGUI_BACKEND_SRC_DIR imgui_impl_glfw.cpp
          PATHS /usr/share/doc/libimgui-dev/examples/backends /usr/share/imgui/backends NO_DEFAULT_PATH)
find_package(glfw3 QUIET)
set(OpenGL_GL_PREFERENCE GLVND)
find_package(OpenGL QUIET)
find_path(STB_INCLUDE_DIR stb_image_write.h PATHS /usr/include/stb NO_DEFAULT_PATH)
find_library(STB_LIBRARY stb)

set(EPLAB_VIZ_MISSING)
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
