// The Python module gkv_ext._C. Loading it registers the gkv ops (torch.ops.gkv.*); it also says
// whether the CUDA kernels were compiled in, holds the model, cache and engine classes, and reads
// and sets the switches of csrc/switches.h by name.
#include <torch/extension.h>

#include <string>

#include "ops/tuned_linear.h"
#include "switches.h"

void bind_model(pybind11::module& m);   // csrc/python/model.cpp
void bind_engine(pybind11::module& m);  // csrc/python/engine.cpp
void bind_tasks(pybind11::module& m);   // csrc/python/tasks.cpp

namespace {
gkv::Switch switch_named(const std::string& name) {
  if (name == "chained_launch") return gkv::Switch::chained_launch;
  if (name == "decode_linear") return gkv::Switch::decode_linear;
  if (name == "tuned_linear") return gkv::Switch::tuned_linear;
  throw pybind11::value_error("unknown switch '" + name +
                              "' (chained_launch, decode_linear or tuned_linear)");
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  bind_model(m);
  bind_engine(m);
  bind_tasks(m);
  m.def("switch_on", [](const std::string& name) { return gkv::switch_on(switch_named(name)); },
        pybind11::arg("name"));
  m.def("set_switch",
        [](const std::string& name, bool on) { gkv::set_switch(switch_named(name), on); },
        pybind11::arg("name"), pybind11::arg("on"));
  m.def("tuned_linear", &gkv::tuned_linear, pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("bias") = pybind11::none(),
        "linear(x, weight, bias) through the GEMM algorithm timed fastest for its shape on CUDA "
        "(ops/tuned_linear.h); ATen's linear where that does not apply");
  m.def(
      "tuned_linear_choices",
      [] {
        pybind11::list out;
        for (const auto& c : gkv::tuned_linear_choices()) {
          pybind11::dict d;
          d["rows"] = c.rows, d["n"] = c.n, d["k"] = c.k, d["bias"] = c.bias;
          d["dtype"] = c.dtype, d["candidates"] = c.candidates, d["chosen"] = c.chosen;
          d["aten_us"] = c.aten_us, d["chosen_us"] = c.chosen_us;
          out.append(d);
        }
        return out;
      },
      "per shape tuned_linear has timed: the candidates, the one chosen (-1: ATen's linear) and "
      "the median microseconds of ATen's linear and of the chosen one");
#ifdef GKV_WITH_CUBLASLT
  m.attr("built_with_cublaslt") = true;
#else
  m.attr("built_with_cublaslt") = false;
#endif
#ifdef GKV_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
