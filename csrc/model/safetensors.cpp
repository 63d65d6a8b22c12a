#include "model/safetensors.h"

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace gkv::model {

namespace fs = std::filesystem;
using nlohmann::json;

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swaps");

namespace {

constexpr std::array<std::pair<const char*, c10::ScalarType>, 10> kDtypes = {{
    {"F64", c10::kDouble}, {"F32", c10::kFloat}, {"F16", c10::kHalf}, {"BF16", c10::kBFloat16},
    {"I64", c10::kLong}, {"I32", c10::kInt}, {"I16", c10::kShort}, {"I8", c10::kChar},
    {"U8", c10::kByte}, {"BOOL", c10::kBool},
}};

const char* dtype_code(c10::ScalarType t) {
  for (const auto& [code, type] : kDtypes) {
    if (type == t) return code;
  }
  throw std::runtime_error(c10::str("safetensors: cannot store dtype ", t));
}

// Closes the descriptor on every path out.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

[[noreturn]] void sys_fail(const std::string& what, const fs::path& path) {
  throw std::runtime_error(c10::str(what, " ", path.string(), ": ", std::strerror(errno)));
}

// Reads exactly n bytes at offset (pread may return short counts).
void read_exact(int fd, void* dst, uint64_t n, uint64_t offset, const fs::path& path) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t got = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) sys_fail("cannot read", path);
    if (got == 0) {
      throw std::runtime_error(c10::str(path.string(), ": unexpected end of file (truncated?)"));
    }
    p += got;
    n -= static_cast<uint64_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

void write_all(int fd, const void* src, uint64_t n, const fs::path& path) {
  const auto* p = static_cast<const char*>(src);
  while (n > 0) {
    ssize_t put = ::write(fd, p, n);
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) sys_fail("cannot write", path);
    p += put;
    n -= static_cast<uint64_t>(put);
  }
}

void fsync_path(const fs::path& path, int flags) {
  Fd f{::open(path.c_str(), flags)};
  if (f.fd < 0) sys_fail("cannot open", path);
  if (::fsync(f.fd) != 0) sys_fail("cannot fsync", path);
}

// A temporary name beside `path` that no other process writing the same target uses.
fs::path temp_beside(const fs::path& path, const char* tag) {
  return path.parent_path() / c10::str(".", path.filename().string(), ".", tag, "-", ::getpid());
}

// Swaps two paths in one step (Linux's renameat2 RENAME_EXCHANGE), so that replacing a directory
// never leaves its name missing; false where the filesystem or kernel cannot.
bool exchange_paths(const fs::path& a, const fs::path& b) {
  return ::renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) == 0;
}

fs::path parent_or_dot(const fs::path& p) {
  return p.has_parent_path() ? p.parent_path() : fs::path(".");
}

}  // namespace

SafetensorsFile::SafetensorsFile(fs::path path) : path_(std::move(path)) {
  const std::string where = path_.string();
  auto fail = [&](const std::string& why) -> void {
    throw std::runtime_error(c10::str("safetensors file ", where, ": ", why));
  };
  Fd f{::open(path_.c_str(), O_RDONLY)};
  if (f.fd < 0) sys_fail("cannot open safetensors file", path_);
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) sys_fail("cannot stat", path_);
  const auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) fail(c10::str("truncated: ", file_size, " bytes, shorter than the 8-byte header length"));

  uint64_t header_len = 0;
  read_exact(f.fd, &header_len, 8, 0, path_);
  if (header_len > file_size - 8) {
    fail(c10::str("truncated: header length ", header_len, " exceeds the ", file_size - 8,
                  " bytes after the length field"));
  }
  std::string text(header_len, '\0');
  read_exact(f.fd, text.data(), header_len, 8, path_);
  json header = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) fail("header is not valid JSON");
  if (!header.is_object()) fail("header is not a JSON object");
  data_offset_ = 8 + header_len;
  const uint64_t data_size = file_size - data_offset_;

  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail("__metadata__ is not an object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) fail(c10::str("__metadata__ value of '", k, "' is not a string"));
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& why) { fail(c10::str("tensor '", name, "': ", why)); };
    if (!value.is_object()) bad("entry is not an object");
    if (!value.contains("dtype") || !value["dtype"].is_string()) bad("missing or non-string 'dtype'");
    if (!value.contains("shape") || !value["shape"].is_array()) bad("missing or non-list 'shape'");
    if (!value.contains("data_offsets") || !value["data_offsets"].is_array() ||
        value["data_offsets"].size() != 2) {
      bad("'data_offsets' must be a list of two integers");
    }
    TensorEntry e;
    const std::string code = value["dtype"].get<std::string>();
    auto known = std::find_if(kDtypes.begin(), kDtypes.end(),
                              [&](const auto& d) { return code == d.first; });
    if (known == kDtypes.end()) bad(c10::str("unknown dtype '", code, "'"));
    e.dtype = known->second;

    uint64_t bytes = c10::elementSize(e.dtype);
    for (const json& d : value["shape"]) {
      if (!d.is_number_unsigned()) bad(c10::str("shape entry ", d.dump(), " is not a non-negative integer"));
      auto dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(INT64_MAX) || __builtin_mul_overflow(bytes, dim, &bytes)) {
        bad("shape is too large");
      }
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    for (const json& o : value["data_offsets"]) {
      if (!o.is_number_unsigned()) bad("'data_offsets' must be non-negative integers");
    }
    e.begin = value["data_offsets"][0].get<uint64_t>();
    e.end = value["data_offsets"][1].get<uint64_t>();
    if (e.begin > e.end) bad(c10::str("data_offsets [", e.begin, ", ", e.end, "] are reversed"));
    if (e.end > data_size) {
      bad(c10::str("data_offsets [", e.begin, ", ", e.end, "] lie outside the data section of ",
                   data_size, " bytes (truncated file?)"));
    }
    if (e.end - e.begin != bytes) {
      bad(c10::str("byte span ", e.end - e.begin, " does not match shape x dtype size = ", bytes));
    }
    entries_.emplace(name, std::move(e));
  }

  // The spans, in order, must tile the data section: no two tensors share a byte, and (as the
  // format says) no byte belongs to none, so bytes cut from or added to the file show.
  std::vector<std::pair<const std::string*, const TensorEntry*>> spans;
  for (const auto& [name, e] : entries_) {
    if (e.end > e.begin) spans.emplace_back(&name, &e);
  }
  std::sort(spans.begin(), spans.end(),
            [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  uint64_t covered = 0;
  for (size_t i = 0; i < spans.size(); ++i) {
    const uint64_t begin = spans[i].second->begin;
    if (begin < covered) {
      fail(c10::str("tensors '", *spans[i - 1].first, "' and '", *spans[i].first,
                    "' have overlapping data_offsets"));
    }
    if (begin > covered) {
      fail(c10::str("bytes [", covered, ", ", begin, ") of the data section belong to no tensor "
                    "(the format allows no holes)"));
    }
    covered = spans[i].second->end;
  }
  if (covered != data_size) {
    fail(c10::str("the data section has ", data_size - covered,
                  " bytes after the last tensor's (the format allows none: appended to?)"));
  }
}

at::Tensor SafetensorsFile::load(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    throw std::runtime_error(c10::str("safetensors file ", path_.string(), ": no tensor '", name, "'"));
  }
  const TensorEntry& e = it->second;
  at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
  Fd f{::open(path_.c_str(), O_RDONLY)};
  if (f.fd < 0) sys_fail("cannot open safetensors file", path_);
  read_exact(f.fd, t.data_ptr(), e.end - e.begin, data_offset_ + e.begin, path_);
  return t;
}

void save_safetensors(const fs::path& path, const NamedTensors& tensors,
                      std::map<std::string, std::string> metadata) {
  metadata["format"] = "pt";
  json header;
  header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;  // contiguous CPU views, in file order
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (header.contains(name)) throw std::runtime_error(c10::str("save_safetensors: duplicate tensor name '", name, "'"));
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = t.nbytes();
    header[name] = {{"dtype", dtype_code(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(t));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  const uint64_t header_len = text.size();

  const fs::path tmp = temp_beside(path, "tmp");
  try {
    {
      Fd f{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644)};
      if (f.fd < 0) sys_fail("cannot create", tmp);
      write_all(f.fd, &header_len, 8, tmp);
      write_all(f.fd, text.data(), header_len, tmp);
      for (const at::Tensor& t : data) write_all(f.fd, t.data_ptr(), t.nbytes(), tmp);
      if (::fsync(f.fd) != 0) sys_fail("cannot fsync", tmp);
    }
    fs::rename(tmp, path);
  } catch (...) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
  fsync_path(parent_or_dot(path), O_RDONLY | O_DIRECTORY);
}

SafetensorsCheckpoint::SafetensorsCheckpoint(const fs::path& path) : where_(path) {
  if (fs::is_regular_file(path)) {
    auto file = std::make_shared<SafetensorsFile>(path);
    for (const auto& [name, e] : file->entries()) shard_of_[name] = file;
    return;
  }
  const fs::path single = path / "model.safetensors";
  const fs::path index = path / "model.safetensors.index.json";
  if (fs::exists(single)) {
    auto file = std::make_shared<SafetensorsFile>(single);
    for (const auto& [name, e] : file->entries()) shard_of_[name] = file;
    return;
  }
  if (!fs::exists(index)) {
    throw std::runtime_error(c10::str(path.string(), ": no model.safetensors or model.safetensors.index.json"));
  }
  std::ifstream in(index);
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw std::runtime_error(c10::str(index.string(), ": invalid JSON"));
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    throw std::runtime_error(c10::str(index.string(), ": key 'weight_map' is missing or not an object"));
  }
  std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string()) {
      throw std::runtime_error(c10::str(index.string(), ": weight_map entry '", name, "' is not a string"));
    }
    const std::string shard = file.get<std::string>();
    // Shards must sit in the checkpoint directory itself.
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      throw std::runtime_error(c10::str(index.string(), ": invalid shard file name '", shard, "'"));
    }
    auto& opened = shards[shard];
    if (!opened) opened = std::make_shared<SafetensorsFile>(path / shard);
    if (!opened->contains(name)) {
      throw std::runtime_error(c10::str(index.string(), ": tensor '", name, "' is not in its shard ", shard));
    }
    shard_of_[name] = opened;
  }
}

at::Tensor SafetensorsCheckpoint::load(const std::string& name, c10::IntArrayRef shape) const {
  auto it = shard_of_.find(name);
  if (it == shard_of_.end()) {
    throw std::runtime_error(c10::str("checkpoint ", where_.string(), ": missing tensor '", name, "'"));
  }
  const TensorEntry& e = it->second->entries().at(name);
  if (c10::IntArrayRef(e.shape) != shape) {
    throw std::runtime_error(c10::str("checkpoint ", where_.string(), ": tensor '", name,
                                      "' has shape ", c10::IntArrayRef(e.shape), ", expected ", shape));
  }
  return it->second->load(name);
}

void write_safetensors_shards(const fs::path& dir, const NamedTensors& tensors,
                              uint64_t max_shard_bytes) {
  std::vector<NamedTensors> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const auto& nt : tensors) {
    const uint64_t bytes = nt.second.nbytes();
    if (max_shard_bytes > 0 && in_shard > 0 && in_shard + bytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(nt);
    in_shard += bytes;
    total += bytes;
  }
  if (shards.size() == 1) {
    save_safetensors(dir / "model.safetensors", tensors);
    return;
  }
  json weight_map = json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    save_safetensors(dir / name, shards[i]);
    for (const auto& nt : shards[i]) weight_map[nt.first] = name;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_file_synced(dir / "model.safetensors.index.json", index.dump(2));
}

void write_file_synced(const fs::path& path, const std::string& text) {
  Fd f{::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644)};
  if (f.fd < 0) sys_fail("cannot create", path);
  write_all(f.fd, text.data(), text.size(), path);
  if (::fsync(f.fd) != 0) sys_fail("cannot fsync", path);
}

void write_directory_atomically(const fs::path& dir,
                                const std::function<void(const fs::path&)>& fill) {
  const fs::path target = dir.has_filename() ? dir : dir.parent_path();  // "out/" -> "out"
  const fs::path tmp = temp_beside(target, "tmp");
  const fs::path old = temp_beside(target, "old");
  std::error_code ignored;
  fs::remove_all(tmp, ignored);
  try {
    fs::create_directories(tmp);
    fill(tmp);
    fsync_path(tmp, O_RDONLY | O_DIRECTORY);
    if (!fs::exists(target)) {
      fs::rename(tmp, target);
    } else if (exchange_paths(tmp, target)) {
      fs::remove_all(tmp, ignored);  // tmp now names the old directory
    } else {
      // rename() cannot replace a non-empty directory, and this filesystem cannot exchange two:
      // the old one is moved aside first (a crash between the two renames leaves it at `old`).
      fs::rename(target, old);
      fs::rename(tmp, target);
    }
  } catch (...) {
    fs::remove_all(tmp, ignored);
    if (fs::exists(old) && !fs::exists(target)) fs::rename(old, target, ignored);
    throw;
  }
  fs::remove_all(old, ignored);
  fsync_path(parent_or_dot(target), O_RDONLY | O_DIRECTORY);
}

}  // namespace gkv::model
