// safetensors reader (mmap + full validation before use) and writer. Format and checks: safetensors.hpp.
#include "model/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <utility>

#include <nlohmann/json.hpp>

#include "util/check.hpp"

namespace eplab {

namespace {

// No real checkpoint has a header anywhere near this; a bigger length means a corrupt file, and
// parsing it would only waste memory.
constexpr std::uint64_t kMaxHeaderBytes = 100ull << 20;

bool parse_dtype(const std::string& s, Dtype& out) {
  if (s == "BF16") out = Dtype::BF16;
  else if (s == "F16") out = Dtype::F16;
  else if (s == "F32") out = Dtype::F32;
  else return false;
  return true;
}

// One-line form of a string that came from a file (error messages must stay on one line).
std::string one_line(std::string s, std::size_t max_len = 120) {
  for (char& c : s)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  if (s.size() > max_len) s = s.substr(0, max_len) + "...";
  return s;
}

std::uint64_t read_u64_le(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::uint64_t(p[i]);
  return v;
}

// Reads a JSON value that must be a non-negative integer that fits in 63 bits.
bool get_uint(const nlohmann::json& v, std::uint64_t& out) {
  if (v.is_number_unsigned()) { out = v.get<std::uint64_t>(); return out <= std::uint64_t(INT64_MAX); }
  if (v.is_number_integer()) {
    const auto s = v.get<std::int64_t>();
    if (s < 0) return false;
    out = std::uint64_t(s);
    return true;
  }
  return false;
}

}  // namespace

std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::BF16: return 2;
    case Dtype::F16: return 2;
    case Dtype::F32: return 4;
  }
  return 0;
}

const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::BF16: return "BF16";
    case Dtype::F16: return "F16";
    case Dtype::F32: return "F32";
  }
  return "?";
}

std::int64_t TensorInfo::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string TensorInfo::shape_str() const {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ---------------------------------------------------------------------------------------------- reader

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  require(fd >= 0, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, ": cannot stat (", std::strerror(err), ")");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  const auto file_size = std::uint64_t(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    fail(path, ": file is ", file_size, " bytes, shorter than the 8-byte safetensors header length (truncated?)");
  }
  void* m = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  require(m != MAP_FAILED, path, ": mmap failed (", std::strerror(map_err), ")");
  // From here on `f` owns the mapping: its destructor unmaps it if a check below throws.
  f.map_ = static_cast<const std::byte*>(m);
  f.map_size_ = file_size;

  // 1. header length, bounded by the file and by a sanity cap
  const std::uint64_t header_len = read_u64_le(f.map_);
  require(header_len <= file_size - 8, path, ": header length ", header_len, " runs past the end of the file (",
          file_size, " bytes): truncated or not a safetensors file");
  require(header_len <= kMaxHeaderBytes, path, ": header length ", header_len, " exceeds the ",
          kMaxHeaderBytes >> 20, " MB sanity limit: not a safetensors file");
  require(header_len >= 2, path, ": header of ", header_len, " bytes cannot hold a JSON object");
  f.data_start_ = std::size_t(8 + header_len);
  const std::uint64_t data_size = file_size - f.data_start_;

  // 2. the header is a JSON object
  const char* hbegin = reinterpret_cast<const char*>(f.map_ + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(hbegin, hbegin + header_len);
  } catch (const nlohmann::json::parse_error& e) {
    fail(path, ": header is not valid JSON (byte ", e.byte, " of ", header_len, ")");
  }
  require(header.is_object(), path, ": header is a JSON ", header.type_name(), ", expected an object");

  // 3. every entry: dtype, shape, data_offsets
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      require(v.is_object(), path, ": __metadata__ must be a JSON object of strings");
      for (auto m2 = v.begin(); m2 != v.end(); ++m2) {
        require(m2.value().is_string(), path, ": __metadata__ entry '", one_line(m2.key()), "' is not a string");
        f.metadata_[m2.key()] = m2.value().get<std::string>();
      }
      continue;
    }
    const std::string where = path + ": tensor '" + one_line(name) + "'";
    require(v.is_object(), where, ": entry is not a JSON object");
    auto dt = v.find("dtype"), sh = v.find("shape"), off = v.find("data_offsets");
    require(dt != v.end() && dt->is_string(), where, ": missing or non-string 'dtype'");
    require(sh != v.end() && sh->is_array(), where, ": missing or non-array 'shape'");
    require(off != v.end() && off->is_array() && off->size() == 2, where,
            ": 'data_offsets' must be an array [begin, end]");

    TensorInfo t;
    t.name = name;
    const std::string dts = dt->get<std::string>();
    require(parse_dtype(dts, t.dtype), where, ": unsupported dtype '", one_line(dts, 20),
            "' (EP Lab reads BF16, F16 and F32)");

    // numel with overflow checks: a lying shape must not wrap around to a plausible size
    std::uint64_t numel = 1;
    for (const auto& d : *sh) {
      std::uint64_t dim = 0;
      require(get_uint(d, dim), where, ": shape has a negative or non-integer dimension (", one_line(d.dump(), 30),
              ")");
      t.shape.push_back(std::int64_t(dim));
      if (dim != 0 && numel > std::numeric_limits<std::uint64_t>::max() / 8 / dim)
        fail(where, ": shape ", one_line(sh->dump(), 60), " is absurdly large");
      numel *= dim;
    }
    const std::uint64_t need = numel * dtype_size(t.dtype);

    require(get_uint((*off)[0], t.begin) && get_uint((*off)[1], t.end), where,
            ": data_offsets must be non-negative integers");
    require(t.begin <= t.end, where, ": data_offsets [", t.begin, ", ", t.end, "] has begin > end");
    require(t.end - t.begin == need, where, ": data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin,
            " bytes but shape ", t.shape_str(), " x ", dtype_name(t.dtype), " needs ", need);
    require(t.end <= data_size, where, ": data_offsets [", t.begin, ", ", t.end,
            "] run past the data section (", data_size, " bytes): file truncated or header lies");
    f.tensors_.emplace(name, std::move(t));
  }

  // 4. no two tensors share bytes (empty tensors own no bytes and cannot overlap anything)
  std::vector<const TensorInfo*> by_begin;
  for (const auto& [n, t] : f.tensors_)
    if (t.end > t.begin) by_begin.push_back(&t);
  std::sort(by_begin.begin(), by_begin.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (std::size_t i = 1; i < by_begin.size(); ++i) {
    const TensorInfo* a = by_begin[i - 1];
    const TensorInfo* b = by_begin[i];
    require(b->begin >= a->end, path, ": tensor '", one_line(b->name), "' bytes [", b->begin, ", ", b->end,
            ") overlap tensor '", one_line(a->name), "' bytes [", a->begin, ", ", a->end, ")");
  }
  return f;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept { *this = std::move(o); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    if (map_) ::munmap(const_cast<std::byte*>(map_), map_size_);
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = std::exchange(o.map_size_, 0);
    data_start_ = std::exchange(o.data_start_, 0);
    tensors_ = std::move(o.tensors_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<std::byte*>(map_), map_size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::span<const std::byte> SafetensorsFile::bytes(const TensorInfo& t) const {
  // TensorInfos from this file were range-checked in open(); this guards against one from another file.
  require(t.begin <= t.end && t.end <= map_size_ - data_start_, path_, ": tensor '", t.name,
          "' byte range is outside this file's data section");
  return {map_ + data_start_ + t.begin, std::size_t(t.end - t.begin)};
}

// ---------------------------------------------------------------------------------------------- writer

void SafetensorsWriter::add(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape,
                            std::span<const std::byte> data) {
  require(name != "__metadata__" && !name.empty(), "safetensors writer: invalid tensor name '", name, "'");
  for (const auto& e : entries_) require(e.name != name, "safetensors writer: tensor '", name, "' added twice");
  std::uint64_t numel = 1;
  for (auto d : shape) {
    require(d >= 0, "safetensors writer: tensor '", name, "' has a negative dimension");
    numel *= std::uint64_t(d);
  }
  require(numel * dtype_size(dtype) == data.size(), "safetensors writer: tensor '", name, "' has ", data.size(),
          " bytes, its shape x ", dtype_name(dtype), " needs ", numel * dtype_size(dtype));
  entries_.push_back({name, dtype, std::move(shape), std::vector<std::byte>(data.begin(), data.end())});
  data_bytes_ += data.size();
}

void SafetensorsWriter::write(const std::string& path) const {
  // nlohmann's object keeps keys sorted, so the header is the same for the same tensors.
  nlohmann::json header = nlohmann::json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::uint64_t off = 0;
  for (const auto& e : entries_) {
    header[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {off, off + e.data.size()}}};
    off += e.data.size();
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h += ' ';  // the data section starts 8-byte aligned
  std::byte len[8];
  for (int i = 0; i < 8; ++i) len[i] = std::byte((std::uint64_t(h.size()) >> (8 * i)) & 0xff);

  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  require(bool(f), path, ": cannot open for writing");
  f.write(reinterpret_cast<const char*>(len), 8);
  f.write(h.data(), std::streamsize(h.size()));
  for (const auto& e : entries_) f.write(reinterpret_cast<const char*>(e.data.data()), std::streamsize(e.data.size()));
  f.close();
  require(!f.fail(), path, ": write failed (disk full?)");
}

}  // namespace eplab
