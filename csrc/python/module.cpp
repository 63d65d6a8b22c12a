// The Python module gkv_ext._C. Loading it registers the gkv ops (torch.ops.gkv.*); it also says
// whether the CUDA kernels were compiled in, holds the model, cache and engine classes, and reads
// and sets the switches of csrc/switches.h by name.
#include <torch/extension.h>

#include <string>

#include "switches.h"

void bind_model(pybind11::module& m);   // csrc/python/model.cpp
void bind_engine(pybind11::module& m);  // csrc/python/engine.cpp
void bind_tasks(pybind11::module& m);   // csrc/python/tasks.cpp

namespace {
gkv::Switch switch_named(const std::string& name) {
  if (name == "chained_launch") return gkv::Switch::chained_launch;
  if (name == "decode_linear") return gkv::Switch::decode_linear;
  throw pybind11::value_error("unknown switch '" + name + "' (chained_launch or decode_linear)");
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
#ifdef GKV_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
