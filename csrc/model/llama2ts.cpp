#include "model/llama2ts.h"

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>

namespace gkv::model {

namespace fs = std::filesystem;

namespace {

// Bounds-checked little-endian reads from a file; every error names the file and what was read.
class Reader {
 public:
  explicit Reader(const fs::path& path) : path_(path), in_(path, std::ios::binary) {
    if (!in_) throw std::runtime_error(c10::str("cannot open ", path.string()));
    size_ = fs::file_size(path);
  }
  uint64_t remaining() const { return size_ - offset_; }
  void bytes(void* dst, uint64_t n, const char* what) {
    if (n > remaining()) {
      fail(c10::str("truncated: ", what, " needs ", n, " bytes at offset ", offset_, ", ",
                    remaining(), " left"));
    }
    in_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    if (!in_) fail(c10::str("read error in ", what));
    offset_ += n;
  }
  template <typename T>
  T value(const char* what) {
    T v;
    bytes(&v, sizeof v, what);
    return v;
  }
  void skip_to(uint64_t offset) {
    if (offset > size_) fail("truncated header");
    in_.seekg(static_cast<std::streamoff>(offset));
    offset_ = offset;
  }
  // A new fp32 tensor of this shape, read from the file.
  at::Tensor floats(c10::IntArrayRef shape, const char* what) {
    at::Tensor t = at::empty(shape, at::kFloat);
    bytes(t.data_ptr(), t.nbytes(), what);
    return t;
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error(c10::str(path_.string(), ": ", why));
  }

 private:
  fs::path path_;
  std::ifstream in_;
  uint64_t size_ = 0;
  uint64_t offset_ = 0;
};

// One vocabulary record: float32 score, int32 length, the piece's bytes.
void read_piece(Reader& r, std::vector<std::string>& pieces, std::vector<float>& scores) {
  const auto score = r.value<float>("piece score");
  const auto len = r.value<int32_t>("piece length");
  if (len < 0 || len > 1024) r.fail(c10::str("piece ", pieces.size(), " has invalid length ", len));
  std::string piece(static_cast<size_t>(len), '\0');
  r.bytes(piece.data(), piece.size(), "piece bytes");
  pieces.push_back(std::move(piece));
  scores.push_back(score);
}

bool is_model_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  char head[10] = {};
  in.read(head, sizeof head);
  return in && head[0] == 1 && std::memcmp(head + 1, "\x05\0\0\0llama", 9) == 0;
}

// The usual Llama conversion: rows of each head go from interleaved RoPE pairs (x0,x1),(x2,x3),..
// to rotate-half order (x0,x2,..,x1,x3,..). w [L, H*d, D] -> [L, H*d, D].
at::Tensor interleaved_to_half(const at::Tensor& w, int64_t heads, int64_t head_dim) {
  const int64_t layers = w.size(0), dim = w.size(2);
  return w.view({layers, heads, head_dim / 2, 2, dim}).transpose(2, 3).reshape({layers, heads * head_dim, dim});
}

// A piece as printable ASCII for an error message (a corrupt file's bytes need not be UTF-8).
std::string printable(const std::string& piece) {
  std::string out;
  for (const unsigned char ch : piece) {
    char escaped[5];
    std::snprintf(escaped, sizeof escaped, "\\x%02X", ch);
    out += ch >= 0x20 && ch < 0x7F ? std::string(1, static_cast<char>(ch)) : std::string(escaped);
  }
  return out;
}

std::string with_spaces(std::string piece) {  // U+2581 (sentencepiece's space) -> ' '
  static const std::string kSpace = "\xE2\x96\x81";
  for (size_t at = piece.find(kSpace); at != std::string::npos; at = piece.find(kSpace, at + 1)) {
    piece.replace(at, kSpace.size(), " ");
  }
  return piece;
}

// The header and the vocabulary of a llama2.ts file; leaves `r` at the first tensor.
ModelConfig read_header_and_vocabulary(Reader& r, const fs::path& path, std::vector<std::string>& pieces,
                                       std::vector<float>& scores) {
  if (!is_model_file(path)) r.fail("not a llama2.ts model file (expected version 1 and model type 'llama')");
  r.skip_to(10);
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = r.value<int32_t>("hidden size");
  c.intermediate_size = r.value<int32_t>("ffn size");
  c.max_position_embeddings = r.value<int32_t>("max sequence length");
  c.vocab_size = r.value<int32_t>("vocabulary size");
  c.num_layers = r.value<int32_t>("layer count");
  c.num_heads = r.value<int32_t>("head count");
  c.num_kv_heads = r.value<int32_t>("KV head count");
  // The stories models share the classifier with the embedding; a separate one is not a layout
  // DATA.md describes, so it is refused rather than guessed.
  if (r.value<uint8_t>("shared classifier flag") != 1) r.fail("only a shared classifier (flag 1) is supported");
  c.tie_word_embeddings = true;
  if (c.num_heads <= 0 || c.hidden_size % c.num_heads != 0) {
    r.fail(c10::str("invalid header: hidden size ", c.hidden_size, " is not a multiple of head count ", c.num_heads));
  }
  c.head_dim = c.hidden_size / c.num_heads;
  // llama2.c's fixed hyper-parameters.
  c.rope_theta = 10000.0;
  c.rms_eps = 1e-5;
  c.dtype = at::kFloat;
  c.bos_token_id = Llama2Tokenizer::kBos;
  c.eos_token_ids = {Llama2Tokenizer::kEos};
  try {
    c.validate();
  } catch (const std::exception& e) {
    r.fail(c10::str("invalid header: ", e.what()));
  }
  r.skip_to(256);

  for (int64_t i = 0; i < c.vocab_size; ++i) read_piece(r, pieces, scores);
  return c;
}

}  // namespace

Llama2Tokenizer::Llama2Tokenizer(std::vector<std::string> pieces, std::vector<float> scores)
    : scores_(std::move(scores)) {
  if (pieces.size() != scores_.size() || pieces.size() < kFirstByte + 256) {
    throw std::runtime_error(c10::str("Llama2Tokenizer: need >= 259 pieces with one score each, got ",
                                      pieces.size(), " pieces and ", scores_.size(), " scores"));
  }
  for (int64_t b = 0; b < 256; ++b) {
    char expected[8];
    std::snprintf(expected, sizeof expected, "<0x%02X>", static_cast<unsigned>(b));
    if (pieces[kFirstByte + b] != expected) {
      throw std::runtime_error(c10::str("Llama2Tokenizer: piece ", kFirstByte + b, " is '",
                                        printable(pieces[kFirstByte + b]), "', expected the byte piece ", expected));
    }
  }
  pieces_.reserve(pieces.size());
  for (auto& p : pieces) pieces_.push_back(with_spaces(std::move(p)));
  // Control and byte pieces are produced by fallback only, never by a merge of text.
  for (int64_t id = kFirstByte + 256; id < vocab_size(); ++id) ids_.emplace(pieces_[id], id);
}

Llama2Tokenizer Llama2Tokenizer::load(const fs::path& path) {
  Reader r(path);
  std::vector<std::string> pieces;
  std::vector<float> scores;
  if (is_model_file(path)) {
    read_header_and_vocabulary(r, path, pieces, scores);
  } else {
    r.value<int32_t>("max token length");
    while (r.remaining() > 0) read_piece(r, pieces, scores);
  }
  return Llama2Tokenizer(std::move(pieces), std::move(scores));
}

const std::string& Llama2Tokenizer::piece(int64_t id) const {
  if (id < 0 || id >= vocab_size()) {
    throw std::runtime_error(c10::str("Llama2Tokenizer: token id ", id, " is outside [0, ", vocab_size(), ")"));
  }
  return pieces_[id];
}

std::vector<int64_t> Llama2Tokenizer::encode(const std::string& text, bool bos, bool eos) const {
  std::vector<int64_t> ids;
  if (bos) ids.push_back(kBos);
  std::vector<int64_t> tokens;
  // sentencepiece's dummy prefix: text starts as if after a space.
  const std::string prefixed = text.empty() ? text : " " + text;
  for (size_t i = 0; i < prefixed.size();) {
    size_t n = 1;  // one UTF-8 character: a lead byte and its continuation bytes (at most 4)
    while (i + n < prefixed.size() && n < 4 && (static_cast<unsigned char>(prefixed[i + n]) & 0xC0) == 0x80) ++n;
    auto it = ids_.find(prefixed.substr(i, n));
    if (it != ids_.end()) {
      tokens.push_back(it->second);
    } else {
      for (size_t j = i; j < i + n; ++j) tokens.push_back(kFirstByte + static_cast<unsigned char>(prefixed[j]));
    }
    i += n;
  }
  // Merge the adjacent pair whose merged piece scores best (first on ties) until none merges.
  while (true) {
    float best = -INFINITY;
    size_t best_at = 0;
    int64_t best_id = -1;
    for (size_t i = 0; i + 1 < tokens.size(); ++i) {
      auto it = ids_.find(pieces_[tokens[i]] + pieces_[tokens[i + 1]]);
      if (it != ids_.end() && scores_[it->second] > best) {
        best = scores_[it->second];
        best_at = i;
        best_id = it->second;
      }
    }
    if (best_id < 0) break;
    tokens[best_at] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
  }
  ids.insert(ids.end(), tokens.begin(), tokens.end());
  if (eos) ids.push_back(kEos);
  return ids;
}

std::string Llama2Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string out;
  for (int64_t id : ids) {
    const std::string& p = piece(id);
    if (id == kBos || id == kEos) continue;
    if (id >= kFirstByte && id < kFirstByte + 256) {
      out.push_back(static_cast<char>(id - kFirstByte));
    } else {
      out += p;
    }
  }
  if (!out.empty() && out[0] == ' ') out.erase(0, 1);  // the dummy prefix
  return out;
}

Llama2tsModel load_llama2ts(const fs::path& path) {
  Reader r(path);
  std::vector<std::string> pieces;
  std::vector<float> scores;
  ModelConfig c = read_header_and_vocabulary(r, path, pieces, scores);

  const int64_t L = c.num_layers, D = c.hidden_size, F = c.intermediate_size, V = c.vocab_size;
  const int64_t q_rows = c.num_heads * c.head_dim, kv_rows = c.num_kv_heads * c.head_dim;
  // In 128 bits: a corrupt header's 32-bit sizes multiply past 64 bits.
  using Wide = unsigned __int128;
  const Wide bytes = 4 * (Wide(V) * D + Wide(L) * D * 2 + Wide(L) * q_rows * D * 2 +
                          Wide(L) * kv_rows * D * 2 + Wide(L) * F * D * 3 + D);
  if (bytes != r.remaining()) {
    r.fail(c10::str("tensor section is ", r.remaining(), " bytes, the header implies ",
                    bytes > UINT64_MAX ? std::string("more than 2^64")
                                       : std::to_string(static_cast<uint64_t>(bytes))));
  }
  Weights w;
  w.embed = r.floats({V, D}, "embed");
  at::Tensor attn_norm = r.floats({L, D}, "attn_norm");
  at::Tensor wq = interleaved_to_half(r.floats({L, q_rows, D}, "wq"), c.num_heads, c.head_dim);
  at::Tensor wk = interleaved_to_half(r.floats({L, kv_rows, D}, "wk"), c.num_kv_heads, c.head_dim);
  at::Tensor wv = r.floats({L, kv_rows, D}, "wv");
  at::Tensor wo = r.floats({L, D, q_rows}, "wo");
  at::Tensor mlp_norm = r.floats({L, D}, "ffn_norm");
  at::Tensor w_gate = r.floats({L, F, D}, "w1");
  at::Tensor w_up = r.floats({L, F, D}, "w3");
  at::Tensor w_down = r.floats({L, D, F}, "w2");
  w.final_norm = r.floats({D}, "final_norm");
  w.lm_head = w.embed;
  for (int64_t l = 0; l < L; ++l) {
    LayerWeights& lw = w.layers.emplace_back();
    lw.attn_norm = attn_norm[l];
    lw.wq = wq[l];
    lw.wk = wk[l];
    lw.wv = wv[l];
    lw.wo = wo[l];
    lw.mlp_norm = mlp_norm[l];
    lw.w_gate = w_gate[l];
    lw.w_up = w_up[l];
    lw.w_down = w_down[l];
  }
  return {std::move(c), std::move(w), Llama2Tokenizer(std::move(pieces), std::move(scores))};
}

}  // namespace gkv::model
