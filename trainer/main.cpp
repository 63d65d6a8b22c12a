// gkv-train sft|distill|rl --config FILE [key=value ...]: parses the command line and runs the
// recipe; every error is one line on stderr and a non-zero exit.
#include <c10/util/Exception.h>

#include <iostream>
#include <string>
#include <vector>

#include "trainer/config.h"
#include "trainer/recipes.h"

namespace {

// One line on stderr (the first line of the message), exit status 1.
int fail(const std::string& what) {
  std::cerr << "gkv-train: " << what.substr(0, what.find('\n')) << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace gkv::trainer;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << help_text();
    return args.empty() ? 2 : 0;
  }
  const std::string recipe = args[0];
  std::string config_path;
  std::vector<std::string> overrides;
  for (size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--help" || args[i] == "-h") {
      std::cout << help_text();
      return 0;
    }
    if (args[i] == "--config") {
      if (i + 1 == args.size()) {
        std::cerr << "gkv-train: --config needs a file\n";
        return 2;
      }
      if (!config_path.empty()) {  // the first file's keys would be silently dropped
        std::cerr << "gkv-train: --config given twice; one file, and key=value to override it\n";
        return 2;
      }
      config_path = args[++i];
    } else {
      overrides.push_back(args[i]);
    }
  }
  try {
    if (recipe != "sft" && recipe != "distill" && recipe != "rl") {
      std::cerr << "gkv-train: unknown recipe '" << recipe << "' (sft, distill or rl)\n";
      return 2;
    }
    const Config c = load_config(config_path, overrides);
    if (recipe == "sft") return run_sft(c);
    if (recipe == "distill") return run_distill(c);
    return run_grpo(c);
  } catch (const c10::Error& e) {
    return fail(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}
