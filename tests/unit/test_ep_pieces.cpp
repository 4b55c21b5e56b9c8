// The chunked pipeline's piece rule (common/moe/ep_pieces.hpp), against a brute-force search.
#include <doctest/doctest.h>

#include <initializer_list>

#include "moe/ep_pieces.hpp"

using namespace eplab;

TEST_CASE("ep pieces: the pieces cover a message in order, and piece_containing finds each row's piece") {
  for (int rows : {1, 2, 3, 7, 8, 64, 100, 255, 4096, 16411})
    for (int C : {1, 2, 3, 4, 5, 8, 13, 64, 1024}) {
      CAPTURE(rows);
      CAPTURE(C);
      CHECK(piece_begin(rows, 0, C) == 0);
      CHECK(piece_begin(rows, C, C) == rows);
      for (int c = 0; c < C; ++c) {
        const int size = piece_begin(rows, c + 1, C) - piece_begin(rows, c, C);
        CHECK(size >= rows / C);  // sizes differ by at most one
        CHECK(size <= rows / C + 1);
      }
      int brute = 0;  // the piece of row q by walking the pieces
      for (int q = 0; q < rows; ++q) {
        while (piece_begin(rows, brute + 1, C) <= q) ++brute;
        const int c = piece_containing(rows, q, C);
        if (c != brute) {
          FAIL_CHECK("row " << q << ": piece_containing says " << c << ", the pieces say " << brute);
          break;
        }
      }
    }
}
