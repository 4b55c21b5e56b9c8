// Writes what the current OpenGL framebuffer shows to a PNG (stb_image_write from libstb-dev).
#pragma once
#include <string>

namespace eplab::viz {

// Call after rendering and before swapping buffers. Throws eplab::Error naming the file on failure.
void write_screenshot(const std::string& path, int width, int height);

}  // namespace eplab::viz
