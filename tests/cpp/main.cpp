// Our own main, so the same file works with Catch2 v2 (CATCH_CONFIG_RUNNER) and v3.
#if !__has_include(<catch2/catch_test_macros.hpp>)
#define CATCH_CONFIG_RUNNER
#endif
#include "catch.hpp"

int main(int argc, char* argv[]) { return Catch::Session().run(argc, argv); }
