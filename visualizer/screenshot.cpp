#include "screenshot.hpp"

#include <vector>

#include <GL/gl.h>
#include <stb_image_write.h>

#include "util/check.hpp"

namespace eplab::viz {

void write_screenshot(const std::string& path, int width, int height) {
  require(width > 0 && height > 0, "--screenshot: the framebuffer is empty (", width, "x", height, ")");
  std::vector<unsigned char> px(std::size_t(width) * height * 3);
  glFinish();
  glReadBuffer(GL_BACK);
  glPixelStorei(GL_PACK_ALIGNMENT, 1);
  glReadPixels(0, 0, width, height, GL_RGB, GL_UNSIGNED_BYTE, px.data());
  require(glGetError() == GL_NO_ERROR, "--screenshot: glReadPixels failed");
  // OpenGL's rows start at the bottom; PNG's at the top.
  std::vector<unsigned char> flipped(px.size());
  const std::size_t row = std::size_t(width) * 3;
  for (int y = 0; y < height; ++y)
    std::copy_n(px.data() + row * (height - 1 - y), row, flipped.data() + row * y);
  require(stbi_write_png(path.c_str(), width, height, 3, flipped.data(), int(row)) != 0,
          "--screenshot: cannot write ", path, " (does the directory exist and is it writable?)");
}

}  // namespace eplab::viz
