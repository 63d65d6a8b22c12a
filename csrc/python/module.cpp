// The Python module gkv_ext._C. Loading it registers the gkv ops (torch.ops.gkv.*); it also says
// whether the CUDA kernels were compiled in.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
#ifdef GKV_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
