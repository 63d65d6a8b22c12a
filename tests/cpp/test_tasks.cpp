// The verifiers (GSM8K "####", \boxed{}, exact "Answer:"), the vocab.json reader and the synthetic
// long chain-of-thought task, as the trainer's rewards use them.
#include <filesystem>
#include <fstream>
#include <algorithm>

#include "catch.hpp"
#include "tasks/synthetic.h"
#include "tasks/tasks.h"

using namespace gkv::tasks;

namespace {

std::filesystem::path write_temp(const std::string& name, const std::string& text) {
  const auto path = std::filesystem::temp_directory_path() / name;
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

}  // namespace

TEST_CASE("gsm8k answers: the number after the last ####", "[tasks]") {
  CHECK(extract_answer(AnswerKind::gsm8k, "so 1000 + 234\n#### 1,234") == "1234");
  CHECK(extract_answer(AnswerKind::gsm8k, "#### 72.0") == "72");
  CHECK(extract_answer(AnswerKind::gsm8k, "#### $18.") == "18");
  CHECK(extract_answer(AnswerKind::gsm8k, "#### -5 apples") == "-5");
  CHECK(extract_answer(AnswerKind::gsm8k, "#### 3\n#### 4") == "4");
  CHECK(extract_answer(AnswerKind::gsm8k, "the answer is 4") == "");
  CHECK(extract_answer(AnswerKind::gsm8k, "#### none") == "");
  CHECK(reward(AnswerKind::gsm8k, "#### 1,234", "1234") == 1.0);
  CHECK(reward(AnswerKind::gsm8k, "#### 72", "72.0") == 1.0);
  CHECK(reward(AnswerKind::gsm8k, "#### 72.5", "72.50") == 1.0);
  CHECK(reward(AnswerKind::gsm8k, "#### -5", "-5") == 1.0);
  CHECK(reward(AnswerKind::gsm8k, "#### 5", "-5") == 0.0);
  CHECK(reward(AnswerKind::gsm8k, "#### 73", "72") == 0.0);
  CHECK(reward(AnswerKind::gsm8k, "72", "72") == 0.0);  // no marker, no answer
}

TEST_CASE("boxed answers: the last box, nested braces balanced", "[tasks]") {
  CHECK(extract_answer(AnswerKind::boxed, "so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}");
  CHECK(extract_answer(AnswerKind::boxed, "\\boxed{1} then \\boxed{ 2 }") == "2");
  CHECK(extract_answer(AnswerKind::boxed, "\\boxed{\\frac{1}{2}") == "");  // never closed
  CHECK(extract_answer(AnswerKind::boxed, "no box") == "");
  CHECK(reward(AnswerKind::boxed, "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0);
  CHECK(reward(AnswerKind::boxed, "\\boxed{\\frac{1} {2}}", "\\frac{1}{2}") == 1.0);
  CHECK(reward(AnswerKind::boxed, "\\boxed{72}", "72.0") == 1.0);
  CHECK(reward(AnswerKind::boxed, "\\boxed{1,000}", "1000") == 1.0);
  CHECK(reward(AnswerKind::boxed, "\\boxed{1} \\boxed{2}", "1") == 0.0);
  CHECK(reward(AnswerKind::boxed, "\\boxed{\\frac{1}{3}}", "\\frac{1}{2}") == 0.0);
}

TEST_CASE("exact answers: the rest of the line after the last Answer:", "[tasks]") {
  CHECK(extract_answer(AnswerKind::exact, "a=3\nAnswer: 7") == "7");
  CHECK(extract_answer(AnswerKind::exact, "Answer: 1\nAnswer:  7 \nmore text") == "7");
  CHECK(extract_answer(AnswerKind::exact, "7") == "");
  CHECK(reward(AnswerKind::exact, "Answer: 7\n", " 7") == 1.0);
  CHECK(reward(AnswerKind::exact, "Answer: 7", "70") == 0.0);
  CHECK(reward(AnswerKind::exact, "Answer:", "") == 0.0);  // an empty answer is no answer
}

TEST_CASE("answer kinds parse from their names", "[tasks]") {
  for (const auto k : {AnswerKind::gsm8k, AnswerKind::boxed, AnswerKind::exact}) {
    CHECK(answer_kind_from_string(to_string(k)) == k);
  }
  REQUIRE_THROWS_WITH(answer_kind_from_string("math"), gkv_test::contains("gsm8k, boxed, exact"));
}

TEST_CASE("vocab.json: hex bytes per token; errors name the file", "[tasks]") {
  const auto good = write_temp("gkv_vocab_good.json", R"({"tokens": ["48", "6869", "", "e282"]})");
  const Vocab v = Vocab::load(good);
  CHECK(v.size() == 4);
  CHECK(v.decode({0, 1, 2}) == "Hhi");
  CHECK(v.decode({3}) == "\xe2\x82");  // partial UTF-8 stays bytes
  REQUIRE_THROWS_WITH(v.decode({0, 4}), gkv_test::contains("token id 4 outside [0, 4)"));
  CHECK(v.decode({0, 4, 5, 1}, 6) == "Hhi");  // a padded embedding's extra rows have no text
  REQUIRE_THROWS_WITH(v.decode({6}, 6), gkv_test::contains("token id 6 outside [0, 6)"));
  // A response's final stop token is not part of its text; a stop token inside it is.
  CHECK(response_text(v, {0, 1, 2}, {2}) == "Hhi");
  CHECK(response_text(v, {2, 0, 1}, {2}) == "Hhi");
  CHECK(response_text(v, {}, {2}).empty());
  REQUIRE_THROWS_WITH(v.decode({-1}), gkv_test::contains("token id -1"));

  const auto missing = std::filesystem::temp_directory_path() / "gkv_vocab_missing.json";
  std::filesystem::remove(missing);
  REQUIRE_THROWS_WITH(Vocab::load(missing), gkv_test::contains(missing.string()));
  const auto bad_json = write_temp("gkv_vocab_bad.json", "{\"tokens\": [");
  REQUIRE_THROWS_WITH(Vocab::load(bad_json),
                      gkv_test::contains(bad_json.string()) && gkv_test::contains("invalid JSON"));
  const auto bad_hex = write_temp("gkv_vocab_badhex.json", R"({"tokens": ["41", "4g"]})");
  REQUIRE_THROWS_WITH(Vocab::load(bad_hex),
                      gkv_test::contains(bad_hex.string()) && gkv_test::contains("tokens[1]"));
  const auto odd = write_temp("gkv_vocab_odd.json", R"({"tokens": ["414"]})");
  REQUIRE_THROWS_WITH(Vocab::load(odd), gkv_test::contains("odd number"));
  const auto no_list = write_temp("gkv_vocab_nolist.json", R"({"vocab": []})");
  REQUIRE_THROWS_WITH(Vocab::load(no_list), gkv_test::contains("\"tokens\""));
}

TEST_CASE("synthetic task: deterministic, verifiable, long-range, length knob", "[tasks]") {
  namespace syn = gkv::tasks::synthetic;
  const syn::Options o = syn::options_for_length(1024);
  const auto a = syn::make_example(o, 7), b = syn::make_example(o, 7), c = syn::make_example(o, 8);
  CHECK(a.prompt == b.prompt);
  CHECK(a.response == b.response);
  CHECK(a.prompt != c.prompt);
  CHECK(reward(AnswerKind::exact, a.response, a.answer) == 1.0);
  CHECK(extract_answer(AnswerKind::exact, a.response) == a.answer);

  // Every lookup line of the response is a definition line of the prompt.
  const auto first_lookup = a.response.substr(0, a.response.find('\n', 0));
  CHECK(("\n" + a.prompt).find("\n" + first_lookup + "\n") != std::string::npos);

  for (const int64_t target : {256, 512, 1024, 2048, 4096}) {
    const syn::Options t = syn::options_for_length(target);
    for (uint64_t seed = 0; seed < 4; ++seed) {
      const auto ex = syn::make_example(t, seed);
      const auto chars = static_cast<double>(ex.prompt.size() + ex.response.size());
      CHECK(chars > 0.85 * target);
      CHECK(chars < 1.15 * target);
      const auto& v = syn::char_vocabulary();
      const std::string text = ex.prompt + ex.response;
      CHECK(std::all_of(text.begin(), text.end(), [&](char ch) {
        return std::find(v.begin(), v.end(), std::string(1, ch)) != v.end();
      }));
    }
  }
  const auto ids = syn::char_token_ids(a.prompt);
  REQUIRE(ids.size() == a.prompt.size());
  for (size_t i = 0; i < ids.size(); ++i) CHECK(syn::char_vocabulary()[ids[i]] == std::string(1, a.prompt[i]));
  CHECK(syn::char_vocabulary()[syn::kCharBos] == "<bos>");
  CHECK(syn::char_vocabulary()[syn::kCharEos] == "<eos>");
  REQUIRE_THROWS_WITH(syn::char_token_ids("a=B"), gkv_test::contains("byte 66 at offset 2"));

  syn::Options bad;
  bad.chain_depth = 30;
  REQUIRE_THROWS_WITH(syn::make_example(bad, 0), gkv_test::contains("num_variables must be in [chain_depth = 30"));
  bad.modulus = 1;
  REQUIRE_THROWS_WITH(bad.validate(), gkv_test::contains("modulus must be in [2, 1000]"));
  REQUIRE_THROWS_WITH(syn::options_for_length(10), gkv_test::contains("tokens must be in [64, 65536]"));
}
