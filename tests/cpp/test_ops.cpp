// The C++ API (csrc/ops.h) reaches every op through the dispatcher, as the trainer will. Each op is
// checked against a dense ATen formula on a small case, plus one bad input.
#include <torch/torch.h>

#include <climits>

#include "catch.hpp"
#include "ops.h"

namespace {

bool close(const at::Tensor& a, const at::Tensor& b, double atol = 1e-5) {
  return at::allclose(a.to(at::kFloat), b.to(at::kFloat), atol, 1e-4);
}

at::Tensor positions(int64_t b, int64_t h, int64_t n) {
  return at::arange(n, at::kInt).expand({b, h, n}).contiguous();
}

// softmax(scale * q k^T) with key j visible to query i iff mask[i][j]; q [Hq,Tq,d], k [Hkv,Tk,d].
at::Tensor dense_probs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask,
                       double scale) {
  auto group = q.size(0) / k.size(0);
  auto kk = k.repeat_interleave(group, 0);
  auto logits = at::matmul(q, kk.transpose(-1, -2)) * scale;
  return at::softmax(logits.masked_fill(mask.logical_not(), -INFINITY), -1);
}

}  // namespace

TEST_CASE("decode_attention matches dense attention and emits max-over-group scores") {
  at::manual_seed(0);
  auto q = at::randn({2, 4, 8});
  auto k = at::randn({2, 2, 6, 8});
  auto v = at::randn({2, 2, 6, 8});
  auto pos = positions(2, 2, 6);
  auto acc = at::zeros({2, 2, 6});
  auto out = gkv::decode_attention(q, k, v, pos, 6, 0.5, acc);
  for (int64_t b = 0; b < 2; ++b) {
    auto p = dense_probs(q[b].unsqueeze(1), k[b], at::ones({1, 6}, at::kBool), 0.5);  // [4,1,6]
    auto expected = at::matmul(p, v[b].repeat_interleave(2, 0)).squeeze(1);
    REQUIRE(close(out[b], expected));
    auto emitted = std::get<0>(p.squeeze(1).view({2, 2, 6}).max(1));
    REQUIRE(close(acc[b], emitted));
  }
}

TEST_CASE("decode_attention with live_length attends to the slots before it only") {
  at::manual_seed(3);
  auto q = at::randn({1, 4, 8});
  auto k = at::randn({1, 2, 6, 8});
  auto v = at::randn({1, 2, 6, 8});
  auto out = gkv::decode_attention(q, k, v, positions(1, 2, 6), 6, 0.5, std::nullopt,
                                   at::tensor({4}, at::kLong));
  auto first4 = gkv::decode_attention(q, k.narrow(2, 0, 4), v.narrow(2, 0, 4), positions(1, 2, 4),
                                      4, 0.5);
  REQUIRE(close(out, first4));
  REQUIRE_THROWS_WITH(gkv::decode_attention(q, k, v, positions(1, 2, 6), 6, 0.5, std::nullopt,
                                            at::tensor({4}, at::kInt)),
                      gkv_test::contains("live_length must be Long"));
}

TEST_CASE("window_scores with one window query is its max-over-group probability") {
  at::manual_seed(1);
  auto q = at::randn({1, 4, 1, 8});
  auto k = at::randn({1, 2, 5, 8});
  auto s = gkv::window_scores(q, k, positions(1, 2, 5), 0.3);
  auto p = dense_probs(q[0], k[0], at::ones({1, 5}, at::kBool), 0.3).squeeze(1);  // [4,5]
  auto expected = std::get<0>(p.view({2, 2, 5}).max(1)).slice(-1, 0, 4);
  REQUIRE(s.sizes() == at::IntArrayRef({1, 2, 4}));
  REQUIRE(close(s[0], expected));
}

TEST_CASE("redundancy_scores is a distribution over valid slots") {
  at::manual_seed(2);
  auto k = at::randn({1, 1, 7, 16});
  auto pos = positions(1, 1, 7);
  pos.index_put_({0, 0, 0}, -1);
  auto r = gkv::redundancy_scores(k, pos);
  REQUIRE(r[0][0][0].item<float>() == 0.0f);
  REQUIRE(std::abs(r.sum().item<float>() - 1.0f) < 1e-5);
}

TEST_CASE("select_keep keeps the best candidates in slot order, then the window") {
  auto score = at::tensor({0.1f, 0.9f, 0.3f, 0.8f, 0.2f}).view({1, 1, 5});
  auto idx = gkv::select_keep(score, 2, 3);
  REQUIRE(at::equal(idx.view({-1}), at::tensor({1, 3, 5, 6, 7}, at::kLong)));
}

TEST_CASE("compact_ moves kept slots to the front of every buffer") {
  auto k = at::arange(2 * 5 * 2, at::kFloat).view({1, 2, 5, 2}).contiguous();
  auto v = -k.clone();
  auto pos = positions(1, 2, 5);
  auto score = at::arange(10, at::kFloat).view({1, 2, 5}).contiguous();
  auto idx = at::tensor({0, 2, 4, 1, 3, 4}, at::kLong).view({1, 2, 3});
  auto k_expected = at::gather(k, 2, idx.unsqueeze(-1).expand({1, 2, 3, 2}));
  gkv::compact_(k, v, pos, score, idx);
  REQUIRE(at::equal(k.slice(2, 0, 3), k_expected));
  REQUIRE(at::equal(v.slice(2, 0, 3), -k_expected));
  REQUIRE(at::equal(pos.slice(2, 0, 3), idx.to(at::kInt)));
}

TEST_CASE("gather_tokens backward scatter-adds through the C++ autograd") {
  auto x = torch::randn({1, 1, 4, 3}, torch::requires_grad());
  auto idx = at::tensor({2, 0, 2}, at::kLong).view({1, 1, 3});
  auto y = gkv::gather_tokens(x, idx);
  y.sum().backward();
  auto expected = at::tensor({1.f, 0.f, 2.f, 0.f}).view({1, 1, 4, 1}).expand({1, 1, 4, 3});
  REQUIRE(at::equal(x.grad(), expected));
}

TEST_CASE("lifetime_attention without evictions is causal attention") {
  at::manual_seed(3);
  const int64_t t = 9;
  auto q = at::randn({1, 4, t, 8});
  auto k = at::randn({1, 2, t, 8});
  auto v = at::randn({1, 2, t, 8});
  auto death = at::full({1, 2, t}, INT_MAX, at::kInt);
  auto [out, lse] = gkv::lifetime_attention(q, k, v, death, 0.25);
  auto causal = at::ones({t, t}, at::kBool).tril();
  auto p = dense_probs(q[0], k[0], causal, 0.25);
  REQUIRE(close(out[0], at::matmul(p, v[0].repeat_interleave(2, 0))));
  REQUIRE(lse.scalar_type() == at::kFloat);
}

TEST_CASE("rms_norm and apply_rope match their formulas and differentiate through C++ autograd") {
  at::manual_seed(4);
  auto x = torch::randn({3, 5, 64}, torch::requires_grad());
  auto weight = torch::randn({64}, torch::requires_grad());
  auto normed = gkv::rms_norm(x, weight, 1e-6);
  REQUIRE(close(normed, weight * x * at::rsqrt(x.pow(2).mean(-1, true) + 1e-6)));
  // q [B,H,T,d] as a transposed view, cos/sin [B,1,T,d]; rotate_half(q) = cat(-q2, q1).
  auto q = normed.view({3, 5, 4, 16}).transpose(1, 2);
  auto angles = at::randn({3, 1, 5, 8});
  auto cos = at::cat({angles, angles}, -1).cos(), sin = at::cat({angles, angles}, -1).sin();
  auto rotated = gkv::apply_rope(q, cos, sin);
  auto half = q.split(8, -1);
  REQUIRE(close(rotated, q * cos + at::cat({-half[1], half[0]}, -1) * sin));
  rotated.square().sum().backward();
  // A rotation keeps every pair's norm, so the loss is sum(normed^2) and so are its gradients.
  auto x2 = x.detach().requires_grad_(), w2 = weight.detach().requires_grad_();
  (w2 * x2 * at::rsqrt(x2.pow(2).mean(-1, true) + 1e-6)).square().sum().backward();
  REQUIRE(close(x.grad(), x2.grad(), 1e-4));
  REQUIRE(close(weight.grad(), w2.grad(), 1e-4));
}

TEST_CASE("decode_linear is x W^T + b and differentiates through C++ autograd") {
  at::manual_seed(5);
  auto x = torch::randn({2, 3, 16}, torch::requires_grad());
  auto weight = torch::randn({6, 16}, torch::requires_grad());
  auto bias = torch::randn({6});
  auto out = gkv::decode_linear(x, weight, bias);
  REQUIRE(out.sizes() == at::IntArrayRef({2, 3, 6}));
  REQUIRE(close(out, at::matmul(x, weight.t()) + bias));
  out.sum().backward();
  REQUIRE(close(weight.grad(), x.detach().sum(at::IntArrayRef{0, 1}).expand({6, 16})));
  REQUIRE(close(gkv::decode_linear(x, weight), at::matmul(x, weight.t())));
}

TEST_CASE("bad arguments raise errors naming the argument") {
  auto k = at::randn({1, 2, 5, 8});
  auto pos = positions(1, 2, 5);
  // pos must be int32
  REQUIRE_THROWS_WITH(gkv::redundancy_scores(k, pos.to(at::kLong)),
                      gkv_test::contains("pos"));
  // keep larger than the number of candidates
  REQUIRE_THROWS_WITH(gkv::select_keep(at::randn({1, 2, 5}), 6, 0),
                      gkv_test::contains("keep"));
  REQUIRE_THROWS_WITH(gkv::rms_norm(k, at::ones({4}), 1e-6), gkv_test::contains("weight"));
  REQUIRE_THROWS_WITH(gkv::apply_rope(at::randn({1, 2, 5, 7}), k, k), gkv_test::contains("even"));
  REQUIRE_THROWS_WITH(gkv::decode_linear(k, at::ones({3, 4})), gkv_test::contains("K of x"));
}
