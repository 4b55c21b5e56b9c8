// safetensors files: a memory-mapped, fully validated reader and a writer.
//
// Format: 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the data section. Offsets are relative to the start of the data section.
//
// The reader validates everything before any tensor is used and throws eplab::Error naming the file
// (and tensor) on: a file shorter than 8 bytes, a header length past the end of the file, a header
// that is not a JSON object, an unknown dtype, a shape with negative dims, a byte range that is not
// shape x dtype size, a range outside the data section, two tensors whose ranges overlap.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace eplab {

enum class Dtype { BF16, F16, F32 };
std::size_t dtype_size(Dtype d);
const char* dtype_name(Dtype d);  // "BF16", "F16", "F32" as safetensors spells them

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::BF16;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte range inside the data section
  std::int64_t numel() const;
  std::string shape_str() const;  // "[16, 4096]"
};

// A read-only, memory-mapped safetensors file. Only the pages of tensors you read are touched.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;  // nullptr when absent
  std::span<const std::byte> bytes(const TensorInfo& t) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  const std::byte* map_ = nullptr;
  std::size_t map_size_ = 0;
  std::size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors and writes one safetensors file (tensors in the order added, 8-byte aligned header).
class SafetensorsWriter {
 public:
  void add(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape, std::span<const std::byte> data);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  std::size_t data_bytes() const { return data_bytes_; }
  void write(const std::string& path) const;  // throws eplab::Error on I/O failure

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> data;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
  std::size_t data_bytes_ = 0;
};

}  // namespace eplab
