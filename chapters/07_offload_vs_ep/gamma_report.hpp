// Chapter 07's tables: one model card against one system (γ per token count), and the lesson's overview of
// every card against the stated systems.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "moe/offload_model.hpp"

namespace eplab {

// Stated (nominal) bandwidths of the note's systems, bytes/s per direction.
constexpr double kPcieGen5x16 = 64e9;     // 32 GT/s x 16 lanes, 128b/130b: ~63 GB/s
constexpr double kInfiniBand400 = 50e9;   // 400 Gb/s
constexpr double kNvlink4 = 450e9;        // H100 / H200: 900 GB/s both directions together

// measured[i] < 0: no measured N_ue for tokens[i]. Prints the inputs, the table and the crossover.
nlohmann::json gamma_table(const MoeCard& c, const SystemSpec& s, const std::vector<double>& tokens,
                           const std::vector<double>& measured);

// Every card x (PCIe Gen5 vs 400 Gb/s InfiniBand, PCIe Gen5 vs NVLink): γ at one token and at 4096, the
// crossover N_t.
nlohmann::json overview(const std::vector<MoeCard>& cards, double act_bytes);

}  // namespace eplab
