// Catch2 v2 (Debian's catch2) and v3 (the GPU machine's) behind one include.
#pragma once
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_session.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
namespace gkv_test {
inline auto contains(const std::string& s) { return Catch::Matchers::ContainsSubstring(s); }
}  // namespace gkv_test
#else
#include <catch2/catch.hpp>
namespace gkv_test {
inline auto contains(const std::string& s) { return Catch::Matchers::Contains(s); }
}  // namespace gkv_test
#endif
