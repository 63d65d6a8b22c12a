// The Python module gkv_ext._C. Loading it registers the gkv ops (torch.ops.gkv.*); it also says
// whether the CUDA kernels were compiled in, and holds the model, cache and engine classes.
#include <torch/extension.h>

void bind_model(pybind11::module& m);   // csrc/python/model.cpp
void bind_engine(pybind11::module& m);  // csrc/python/engine.cpp
void bind_tasks(pybind11::module& m);   // csrc/python/tasks.cpp

PYBIND11_MODULE(_C, m) {
  bind_model(m);
  bind_engine(m);
  bind_tasks(m);
#ifdef GKV_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
