// Chapter 05's shared helpers (chapter05.hpp).
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "chapter05.hpp"
#include "util/check.hpp"
#include "util/host_memory.hpp"
#include "util/report.hpp"

namespace eplab {

std::uint64_t fnv1a(const std::vector<std::vector<int>>& seqs) {
  std::uint64_t h = 1469598103934665603ull;
  auto eat = [&](std::uint32_t v) {
    for (int i = 0; i < 4; ++i) h = (h ^ ((v >> (8 * i)) & 0xff)) * 1099511628211ull;
  };
  for (const auto& s : seqs) {
    eat(std::uint32_t(s.size()));
    for (int id : s) eat(std::uint32_t(id));
  }
  return h;
}

std::vector<int> parse_ids(std::string s) {
  std::replace(s.begin(), s.end(), ',', ' ');
  std::vector<int> ids;
  std::stringstream ss(s);
  std::string p;
  while (ss >> p) {
    std::size_t used = 0;
    long v = -1;
    try {
      v = std::stol(p, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    require(used == p.size() && v >= 0 && v < (1l << 31), "--prompt-ids: '", p,
            "' is not a token id (give ids as 1,450,4996)");
    ids.push_back(int(v));
  }
  return ids;
}

std::string id_list(const std::vector<int>& v, std::size_t max_shown) {
  std::string s;
  for (std::size_t i = 0; i < v.size() && i < max_shown; ++i) s += strf(i ? ",%d" : "%d", v[i]);
  if (v.size() > max_shown) s += strf(",... (%zu ids)", v.size());
  return s;
}

std::string safe_decode(const Tokenizer& t, const std::vector<int>& ids) {
  std::string s;
  std::vector<int> run;
  auto flush = [&] {
    if (!run.empty()) s += t.decode(run);
    run.clear();
  };
  for (int id : ids)
    if (id < t.vocab_size()) {
      run.push_back(id);
    } else {
      flush();
      s += "[#" + std::to_string(id) + "]";
    }
  flush();
  return s;
}

std::string safe_piece(const Tokenizer& t, int id) {
  return id < t.vocab_size() ? t.piece(id) : "#" + std::to_string(id);
}

std::string printable(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f) {
      out += strf("\\x%02x", c);
    } else if (c == 0xc2 && i + 1 < s.size() && static_cast<unsigned char>(s[i + 1]) >= 0x80 &&
               static_cast<unsigned char>(s[i + 1]) <= 0x9f) {  // U+0080..U+009F, the C1 controls
      out += strf("\\u%04x", static_cast<unsigned char>(s[++i]));
    } else {
      out += char(c);
    }
  }
  return out;
}

nlohmann::json print_generated(const Options& o, const std::optional<Tokenizer>& tok,
                               const std::vector<std::vector<int>>& prompts, const std::vector<std::vector<int>>& out) {
  nlohmann::json texts = nlohmann::json::array();
  for (int b = 0; b < int(out.size()); ++b) {
    if (tok) {
      const std::string prompt_text = b < int(o.prompts.size()) ? o.prompts[b] : safe_decode(*tok, prompts[b]);
      const std::string text = safe_decode(*tok, out[b]);
      std::printf("[%d] prompt: %s\n[%d] output: %s\n", b, printable(prompt_text).c_str(), b, printable(text).c_str());
      texts.push_back(text);  // as decoded: JSON escapes control characters itself (\u0000)
    }
    std::printf("[%d] prompt ids: %s\n[%d] output ids: %s\n", b, id_list(prompts[b]).c_str(), b,
                id_list(out[b], 64).c_str());
  }
  return texts;
}

std::pair<nlohmann::json, nlohmann::json> print_routing_counts(const EpMoeCounts& cnt, int L, int E, int N) {
  std::vector<std::string> head{"layer"};
  for (int e = 0; e < E; ++e) head.push_back(strf("e%d", e));
  Table te(head);
  for (int l = 0; l < L; ++l) {
    std::vector<std::string> row{strf("%d", l)};
    for (int e = 0; e < E; ++e) row.push_back(strf("%lld", (long long)cnt.expert_rows[l][e]));
    te.add_row(row);
  }
  std::printf("\nrows per expert and layer (a row = one token's choice of that expert), all steps:\n%s",
              te.str().c_str());
  std::vector<std::string> rhead{"layer"};
  for (int r = 0; r < N; ++r) rhead.push_back(strf("rank %d", r));
  rhead.push_back("max/mean");
  rhead.push_back("off-rank");
  Table tr(rhead);
  nlohmann::json jrank = nlohmann::json::array(), jexp = nlohmann::json::array();
  for (int l = 0; l < L; ++l) {
    const std::vector<std::int64_t> rr = cnt.rank_rows(l);
    std::int64_t tot = 0, mx = 0;
    std::vector<std::string> row{strf("%d", l)};
    for (std::int64_t v : rr) {
      row.push_back(strf("%lld", (long long)v));
      tot += v;
      mx = std::max(mx, v);
    }
    row.push_back(tot ? strf("%.2f", double(mx) * N / tot) : "-");
    row.push_back(tot ? strf("%.0f%%", 100.0 * cnt.off_rank_rows(l) / tot) : "-");
    tr.add_row(row);
    jrank.push_back(rr);
    jexp.push_back(cnt.expert_rows[l]);
  }
  std::printf("\nrows per rank and layer (max/mean = load imbalance: the busiest rank sets the pace; "
              "off-rank = rows the all-to-all moved to another rank):\n%s",
              tr.str().c_str());
  return {jexp, jrank};
}

nlohmann::json expert_map_json(const Placement& placement) {
  nlohmann::json m = nlohmann::json::array();
  for (int r = 0; r < placement.num_ranks(); ++r) m.push_back(placement.experts_of(r));
  return m;
}

void print_cpu_memory_per_rank(dist::Communicator& comm, const Placement& placement, const ModelConfig& c,
                               double load_s) {
  const int rank = comm.rank(), N = comm.size();
  const int L = c.num_hidden_layers, E = c.num_local_experts, H = c.hidden_size;
  const double expert_bytes_each = 3.0 * c.intermediate_size * H * 2;  // w1, w3, w2 in bf16
  const double mem[2] = {expert_bytes_each * L * placement.num_local(rank), process_rss_bytes()};
  std::vector<double> all_mem(rank == 0 ? 2 * N : 0);
  comm.gather(mem, sizeof mem, all_mem.data(), 0);
  if (rank == 0) {
    std::printf("loaded in %.2f s (slowest rank)\n", load_s);
    Table t({"rank", "experts per layer", "expert weights (bf16)", "resident memory (RSS)"});
    for (int r = 0; r < N; ++r)
      t.add_row({strf("%d", r), strf("%d of %d", placement.num_local(r), E), human_bytes(all_mem[2 * r]),
                 human_bytes(all_mem[2 * r + 1])});
    std::printf("memory per rank (all %d experts on one process: %s of expert weights; the rest is replicated, "
                "widened to fp32 on the CPU)\n%s",
                E, human_bytes(expert_bytes_each * L * E).c_str(), t.str().c_str());
    std::fflush(stdout);
  }

}

}  // namespace eplab
