// Our safetensors reader and writer (https://github.com/huggingface/safetensors format: an 8-byte
// little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, __metadata__},
// then the data section). Every header field is validated before any byte of data is read, so a
// truncated or corrupt file gives one std::runtime_error naming the file and the problem.
// Also: sharded checkpoint directories (model.safetensors.index.json) and atomic writes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace gkv::model {

struct TensorEntry {
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte span [begin, end) inside the data section
  uint64_t end = 0;
};

// One .safetensors file. The constructor reads and validates the header; load() reads one tensor.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(std::filesystem::path path);

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, TensorEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // A new CPU tensor with the stored dtype and shape.
  at::Tensor load(const std::string& name) const;

 private:
  std::filesystem::path path_;
  uint64_t data_offset_ = 0;  // 8 + N
  std::map<std::string, TensorEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes `tensors` (any device, any strides) as one safetensors file, atomically: a temporary file
// in the same directory, fsync, rename. Metadata always carries format=pt (transformers needs it).
void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      std::map<std::string, std::string> metadata = {});

// The tensors of a checkpoint directory: model.safetensors, or the shards that
// model.safetensors.index.json names (a path to a single .safetensors file also works).
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::filesystem::path& path);

  bool contains(const std::string& name) const { return shard_of_.count(name) != 0; }
  // Throws naming the tensor when it is absent or its shape differs from `shape`.
  at::Tensor load(const std::string& name, c10::IntArrayRef shape) const;

 private:
  std::filesystem::path where_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> shard_of_;
};

// Writes tensors into `dir` as model.safetensors, or, when their total size exceeds
// max_shard_bytes (> 0), as model-0000i-of-0000n.safetensors shards plus the index file.
void write_safetensors_shards(const std::filesystem::path& dir, const NamedTensors& tensors,
                              uint64_t max_shard_bytes = 0);

// Creates directory `dir` atomically: `fill` writes into a fresh temporary directory beside it,
// which is fsynced and renamed to `dir`. An existing `dir` is exchanged with it in one step where
// the filesystem can (Linux renameat2), so the name is never missing. On an exception the
// temporary directory is removed and `dir` is left as it was.
void write_directory_atomically(const std::filesystem::path& dir,
                                const std::function<void(const std::filesystem::path&)>& fill);

// Writes a small text file and fsyncs it (for config.json inside an atomic directory).
void write_file_synced(const std::filesystem::path& path, const std::string& text);

}  // namespace gkv::model
