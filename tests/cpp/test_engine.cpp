// The cache and engine C++ API as the trainer uses it: a policy built from parts, generation on a
// small random decoder with a compressing policy (flat memory, deaths logged), teacher-forced
// chunks making the same decisions, and clear errors.
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include "cache/kv_cache.h"
#include "cache/policy.h"
#include "catch.hpp"
#include "engine/generate.h"
#include "model/decoder.h"

using namespace gkv;

namespace {

model::Decoder random_decoder() {
  at::manual_seed(0);
  nlohmann::json j = {{"model_type", "qwen2"},     {"hidden_size", 32},       {"intermediate_size", 48},
                      {"num_hidden_layers", 2},    {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"vocab_size", 50},          {"tie_word_embeddings", true}};
  return model::Decoder::from_named(model::parse_config(j), [](const std::string&, c10::IntArrayRef shape) {
    return at::randn(shape) * 0.3;
  });
}

const std::vector<std::vector<int64_t>> kPrompts = {{3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3}, {27, 18}};

}  // namespace

TEST_CASE("a policy is data: a new one from the same parts", "[cache]") {
  cache::Policy p = cache::Policy::gkv(16, /*window=*/4);
  p.divide_length = 8;
  p.pool_kernel = 5;
  p.history = cache::History::mean;
  p.sinks = 2;
  REQUIRE_NOTHROW(p.validate());
  p.lambda = 1.5;
  REQUIRE_THROWS_WITH(p.validate(), gkv_test::contains("lambda must be in [0, 1]"));
  REQUIRE_THROWS_WITH(cache::Policy::snapkv(8, 16), gkv_test::contains("must be >= window"));
}

TEST_CASE("generation compresses in place and teacher forcing makes the same decisions", "[engine]") {
  const auto model = random_decoder();
  cache::Policy p = cache::Policy::gkv(10, /*window=*/4);
  p.divide_length = 8;
  engine::GenerateOptions o;
  o.max_new_tokens = 30;
  o.eos_token_ids = std::vector<int64_t>{};
  const auto gen = engine::generate(model, kPrompts, p, o);
  REQUIRE(gen.tokens.sizes() == c10::IntArrayRef({2, 30}));
  REQUIRE(gen.death.sizes() == c10::IntArrayRef({2, 2, 2, 12 + 30}));
  REQUIRE(gen.death.lt(std::numeric_limits<int32_t>::max()).any().item<bool>());

  const auto forced = engine::teacher_forced(model, kPrompts, gen.tokens, p);
  REQUIRE(at::equal(forced.death, gen.death));
  REQUIRE(at::allclose(forced.logprobs, gen.logprobs, 1e-4, 1e-4));

  // on_token streams each step's tokens; false ends the generation after that step.
  std::vector<at::Tensor> streamed;
  o.on_token = [&](int64_t step, const at::Tensor& tokens) {
    REQUIRE(step == static_cast<int64_t>(streamed.size()));
    streamed.push_back(tokens.clone());
    return step < 9;
  };
  const auto cut = engine::generate(model, kPrompts, p, o);
  REQUIRE(streamed.size() == 10);
  REQUIRE(at::equal(at::stack(streamed, 1), gen.tokens.narrow(1, 0, 10)));
  REQUIRE(at::equal(cut.tokens, gen.tokens.narrow(1, 0, 10)));

  // Without the eviction log: the same generation, and no log.
  o.on_token = nullptr;
  o.eviction_log = false;
  const auto unlogged = engine::generate(model, kPrompts, p, o);
  REQUIRE(at::equal(unlogged.tokens, gen.tokens));
  REQUIRE(at::equal(unlogged.logprobs, gen.logprobs));
  REQUIRE_FALSE(unlogged.death.defined());
}

TEST_CASE("the cache's buffers are allocated once", "[cache]") {
  cache::Policy p = cache::Policy::snapkv(12, /*window=*/4);
  p.divide_length = 4;
  cache::CompressedKVCache kv(p, {1, 1, 4, 2, 8, at::kFloat, at::kCPU}, 64);
  REQUIRE(kv.capacity() == 16);
  const void* k = kv.keys(0).data_ptr();
  kv.begin_prefill(at::ones({1, 10}, at::kLong));
  kv.attend(0, at::randn({1, 4, 10, 8}), at::randn({1, 2, 10, 8}), at::randn({1, 2, 10, 8}));
  kv.end_forward();
  for (int i = 0; i < 40; ++i) {
    kv.begin_decode(1);
    kv.attend(0, at::randn({1, 4, 1, 8}), at::randn({1, 2, 1, 8}), at::randn({1, 2, 1, 8}));
    kv.end_forward();
    REQUIRE(kv.length() <= kv.capacity());
  }
  REQUIRE(kv.keys(0).data_ptr() == k);
  REQUIRE(kv.length() == 12);  // forward 40 was a compression step
}

TEST_CASE("a replayed decode step keeps the books of an eager one", "[cache]") {
  // DecodeStepper replays a CUDA graph for the device work through account_replayed_decode; it
  // must leave the cache where begin_decode + attend + end_forward would, run the replay once,
  // after its checks, and compress after it on a compression step.
  cache::Policy p = cache::Policy::snapkv(12, /*window=*/4);
  p.divide_length = 4;
  const cache::CacheShape shape{1, 1, 4, 2, 8, at::kFloat, at::kCPU};
  cache::CompressedKVCache eager(p, shape, 64), replayed(p, shape, 64);
  for (auto* kv : {&eager, &replayed}) {
    kv->begin_prefill(at::ones({1, 10}, at::kLong));
    kv->attend(0, at::randn({1, 4, 10, 8}), at::randn({1, 2, 10, 8}), at::randn({1, 2, 10, 8}));
    kv->end_forward();
  }
  int replays = 0;
  for (int step = 1; step <= 4; ++step) {  // forward 4 compresses: 14 live slots > budget 12
    REQUIRE(eager.decode_compresses(1) == (step == 4));
    eager.begin_decode(1);
    eager.attend(0, at::randn({1, 4, 1, 8}), at::randn({1, 2, 1, 8}), at::randn({1, 2, 1, 8}));
    eager.end_forward();
    replayed.account_replayed_decode([&] { ++replays; });
    REQUIRE(replays == step);
    REQUIRE(replayed.length() == eager.length());
    REQUIRE(replayed.forwards() == eager.forwards());
    REQUIRE(replayed.decode_span() == eager.decode_span());
  }
  REQUIRE(replayed.length() == 12);

  cache::CompressedKVCache full(cache::Policy::full_kv(), shape, 10);
  full.begin_prefill(at::ones({1, 10}, at::kLong));
  full.attend(0, at::randn({1, 4, 10, 8}), at::randn({1, 2, 10, 8}), at::randn({1, 2, 10, 8}));
  full.end_forward();
  REQUIRE_THROWS_WITH(full.account_replayed_decode([&] { ++replays; }),
                      gkv_test::contains("overflow"));
  REQUIRE(replays == 4);  // a step that does not fit never reaches the device
}
