// Expert-parallel load balancing (EPLB): from the measured load of every logical expert, choose R physical
// expert slots, spread over G GPUs (R / G each), so that every GPU gets about the same number of tokens.
// The algorithm is DeepSeek's `rebalance_experts` (deepseek-ai/EPLB), which vLLM's EPLB runs too:
//
//   hierarchical policy (expert groups divisible by nodes; DeepSeek-V3 routes within a few groups):
//     1. pack the expert GROUPS onto nodes, balancing each node's tokens (so a group's experts share a node
//        and cross-node traffic stays low);
//     2. inside each node, replicate its hottest experts: each extra slot goes to the expert with the most
//        tokens per replica so far, until the node's R / nodes slots are used;
//     3. pack each node's slots onto its GPUs (R / G slots per GPU), balancing tokens per GPU.
//   global policy (groups not divisible by nodes): the same with one group and one node, i.e. replicas
//     chosen over all experts and packed onto all GPUs.
//   balanced packing: items in decreasing weight, each to the lightest pack that still has room.
//
// The result, per layer: phy2log[L][R] (the logical expert in each physical slot; GPU g holds slots
// [g R/G, (g+1) R/G)), log2phy[L][E][maxcnt] (each expert's slots, -1-padded), logcnt[L][E] (replicas).
// Known limits of the policy (chapter 06's README shows them): under the hierarchical policy a hot expert
// is replicated only inside its own node; nothing stops two replicas of one expert landing on one GPU.
#pragma once
#include <cstdint>
#include <vector>

namespace eplab {

struct EplbPlan {
  int layers = 0, experts = 0, slots = 0, gpus = 0, max_replicas = 0;
  std::vector<std::vector<int>> phy2log;                // [L][R]
  std::vector<std::vector<std::vector<int>>> log2phy;   // [L][E][max_replicas], -1 where an expert has fewer
  std::vector<std::vector<int>> logcnt;                 // [L][E] replicas of each expert
};

// weight[L][E]: tokens (or any load) per logical expert and layer. num_slots R >= E, a multiple of num_gpus
// and of num_nodes; num_gpus a multiple of num_nodes; experts E a multiple of num_groups. Throws eplab::Error
// (one line) otherwise. Hierarchical when num_groups % num_nodes == 0, else global (as DeepSeek's code).
EplbPlan rebalance_experts(const std::vector<std::vector<double>>& weight, int num_slots, int num_groups, int num_nodes,
                           int num_gpus);

// The two pieces the policies are built from, for the tests and the lesson.
struct Packing {
  std::vector<int> pack, rank_in_pack;  // per item: its pack and its position inside that pack
};
// Items in decreasing weight (ties: lower index first), each to the lightest pack with room (ties: the
// lower pack); every pack gets items / packs items. One item per pack: item i goes to pack i.
Packing balanced_packing(const std::vector<double>& weight, int num_packs);
struct Replication {
  std::vector<int> phy2log, rank;  // per slot: its expert, and which replica of it (0 = the first)
  std::vector<int> logcnt;         // per expert: replicas
};
// Slots 0..E-1 hold experts 0..E-1; each further slot goes to the expert with the largest weight / replicas
// (ties: the lower id).
Replication replicate_experts(const std::vector<double>& weight, int num_slots);

// Load of a placement: tokens per GPU when expert e's tokens are split evenly over its replicas.
std::vector<double> gpu_load(const std::vector<double>& expert_tokens, const std::vector<int>& phy2log, int num_gpus);
// Balancedness = mean / max tokens per GPU (vLLM's, 1 = perfect), and its inverse max / mean (the slowdown
// the busiest GPU causes). Both 1 for an idle layer.
double balancedness(const std::vector<double>& per_gpu);
double imbalance(const std::vector<double>& per_gpu);

}  // namespace eplab
