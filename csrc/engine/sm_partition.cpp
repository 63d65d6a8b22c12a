#include "engine/sm_partition.h"

#include <c10/util/Exception.h>

#ifdef GKV_WITH_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#endif

namespace gkv::engine {

#ifdef GKV_WITH_CUDA
namespace {

// The driver's green-context entry points, looked up through the runtime so that the extension
// does not link libcuda itself (torch does the same).
struct GreenApi {
  decltype(&cuDeviceGetDevResource) get_resource;
  decltype(&cuDevSmResourceSplitByCount) split;
  decltype(&cuDevResourceGenerateDesc) describe;
  decltype(&cuGreenCtxCreate) create;
  decltype(&cuGreenCtxDestroy) destroy;
  decltype(&cuGreenCtxStreamCreate) create_stream;
  decltype(&cuStreamDestroy) destroy_stream;

  static const GreenApi& get() {
    static const GreenApi api = [] {
      GreenApi a{};
      auto load = [](const char* name, auto& fn) {
        void* p = nullptr;
        cudaDriverEntryPointQueryResult found{};
        const cudaError_t err =
            cudaGetDriverEntryPointByVersion(name, &p, CUDA_VERSION, cudaEnableDefault, &found);
        TORCH_CHECK(err == cudaSuccess && found == cudaDriverEntryPointSuccess && p != nullptr,
                    "gkv::SmPartition: the CUDA driver has no ", name,
                    " (green contexts need a CUDA 12.5+ driver)");
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
      };
      load("cuDeviceGetDevResource", a.get_resource);
      load("cuDevSmResourceSplitByCount", a.split);
      load("cuDevResourceGenerateDesc", a.describe);
      load("cuGreenCtxCreate", a.create);
      load("cuGreenCtxDestroy", a.destroy);
      load("cuGreenCtxStreamCreate", a.create_stream);
      load("cuStreamDestroy", a.destroy_stream);
      return a;
    }();
    return api;
  }
};

void check(CUresult result, const char* what) {
  TORCH_CHECK(result == CUDA_SUCCESS, "gkv::SmPartition: ", what, " failed (CUresult ",
              static_cast<int>(result), ")");
}

}  // namespace

struct SmPartition::Contexts {
  CUgreenCtx context[2] = {nullptr, nullptr};
  CUstream stream[2] = {nullptr, nullptr};
  int sms[2] = {0, 0};

  ~Contexts() {
    const GreenApi& api = GreenApi::get();
    for (int i = 0; i < 2; ++i) {
      if (stream[i] != nullptr) api.destroy_stream(stream[i]);
      if (context[i] != nullptr) api.destroy(context[i]);
    }
  }
};

SmPartition::SmPartition(int device, int first_sms) : device_(device) {
  TORCH_CHECK(first_sms >= 1, "gkv::SmPartition: first_sms must be >= 1, got ", first_sms);
  int current = 0;
  TORCH_CHECK(cudaGetDevice(&current) == cudaSuccess, "gkv::SmPartition: no CUDA device");
  // The green contexts need the device's primary context; the caller's device stays current.
  const bool ready = cudaSetDevice(device) == cudaSuccess && cudaFree(nullptr) == cudaSuccess;
  cudaSetDevice(current);
  TORCH_CHECK(ready, "gkv::SmPartition: cannot use CUDA device ", device);
  const GreenApi& api = GreenApi::get();
  CUdevResource whole{}, parts[2]{};
  check(api.get_resource(device, &whole, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource");
  unsigned groups = 1;
  check(api.split(&parts[0], &groups, &whole, &parts[1], 0, static_cast<unsigned>(first_sms)),
        "cuDevSmResourceSplitByCount");
  TORCH_CHECK(groups == 1 && parts[1].sm.smCount > 0, "gkv::SmPartition: first_sms = ",
              first_sms, " leaves no SMs for the second set (the device has ",
              whole.sm.smCount, ")");
  auto owned = std::make_unique<Contexts>();
  for (int i = 0; i < 2; ++i) {
    CUdevResourceDesc desc{};
    check(api.describe(&desc, &parts[i], 1), "cuDevResourceGenerateDesc");
    check(api.create(&owned->context[i], desc, device, CU_GREEN_CTX_DEFAULT_STREAM),
          "cuGreenCtxCreate");
    check(api.create_stream(&owned->stream[i], owned->context[i], CU_STREAM_NON_BLOCKING, 0),
          "cuGreenCtxStreamCreate");
    owned->sms[i] = static_cast<int>(parts[i].sm.smCount);
  }
  contexts_ = std::move(owned);
}

int SmPartition::sms(int set) const {
  TORCH_CHECK(set == 0 || set == 1, "gkv::SmPartition: set must be 0 or 1, got ", set);
  return contexts_->sms[set];
}

std::uintptr_t SmPartition::stream(int set) const {
  TORCH_CHECK(set == 0 || set == 1, "gkv::SmPartition: set must be 0 or 1, got ", set);
  return reinterpret_cast<std::uintptr_t>(contexts_->stream[set]);
}

#else

struct SmPartition::Contexts {};

SmPartition::SmPartition(int device, int) : device_(device) {
  TORCH_CHECK(false, "gkv::SmPartition needs a CUDA build of gkv_ext");
}

int SmPartition::sms(int) const { return 0; }
std::uintptr_t SmPartition::stream(int) const { return 0; }

#endif

SmPartition::~SmPartition() = default;

}  // namespace gkv::engine
