// The chunked pipeline's rule for cutting one message of `rows` rows into C pieces (chapter 04,
// `--chunks C`; kernels/ep/ep_moe_gpu.cu). Piece c is rows [piece_begin(rows, c, C), piece_begin(rows, c + 1, C)):
// sizes differ by at most one, empty pieces only when C > rows. Sender and receiver cut a message by this
// same rule, from counts both already have, so they post the same sizes. Host and device code.
#pragma once

#if defined(__CUDACC__)
#define EPLAB_HOST_DEVICE __host__ __device__
#else
#define EPLAB_HOST_DEVICE
#endif

namespace eplab {

EPLAB_HOST_DEVICE inline int piece_begin(int rows, int c, int C) { return int((long long)rows * c / C); }

// The piece that holds row q (0 <= q < rows) of the message: the largest c with piece_begin(rows, c, C) <= q.
// piece_begin(rows, c, C) <= q  <=>  rows * c < (q + 1) * C  <=>  c <= ((q + 1) * C - 1) / rows.
EPLAB_HOST_DEVICE inline int piece_containing(int rows, int q, int C) {
  const long long c = ((long long)(q + 1) * C - 1) / rows;
  return int(c < C - 1 ? c : C - 1);
}

}  // namespace eplab
