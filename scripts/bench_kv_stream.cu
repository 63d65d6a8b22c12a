// How fast can decode attention's way of streaming K and V read HBM, and on how many SMs?
// Memory-only skeletons of decode_split_mma_kernel's loads (no softmax math): one block per
// (b, KV head) of N live slots out of cap, each warp a ring of cp.async (or bulk-copy) tiles;
// the persistent form holds the stream to a given number of SMs. The peer is a plain
// grid-stride read of the same buffers.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o bench_kv_stream scripts/bench_kv_stream.cu
//   ./bench_kv_stream        (needs ~8 GiB of GPU memory)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

using bf16 = __nv_bfloat16;
constexpr int D = 128, LD = D + 8;

__device__ __forceinline__ void cp16(void* s, const void* g) {
  unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(s));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(g));
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect(uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes));
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int phase) {
  asm volatile(
      "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared.b64 p, [%0], %1;\n @!p bra W;\n}\n" ::"r"(
          smem_u32(bar)),
      "r"(phase));
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, int bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

// Every lane reads its share of a tile from shared memory (as ldmatrix would) into acc.
template <int KEYS>
__device__ __forceinline__ void consume(const bf16* sk, const bf16* sv, int lane, uint32_t& acc) {
#pragma unroll
  for (int i = 0; i < KEYS * 16 / 32; ++i) {
    const int c = lane + 32 * i, r = c / 16, col = (c % 16) * 8;
    const uint4 a = *reinterpret_cast<const uint4*>(sk + r * LD + col);
    const uint4 b = *reinterpret_cast<const uint4*>(sv + r * LD + col);
    acc ^= a.x ^ a.y ^ b.z ^ b.w;
  }
}

// (a) per-warp ring of cp.async tiles, warps interleaved over tiles (our kernel's structure);
// block x streams heads x, x + gridDim.x, ...
template <int W, int KEYS, int S>
__global__ void __launch_bounds__(W * 32) warp_ring(const bf16* K, const bf16* V, int N, int cap,
                                                    uint32_t* out, int heads) {
  extern __shared__ uint4 smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  bf16* ring = reinterpret_cast<bf16*>(smem) + warp * S * 2 * KEYS * LD;
  uint32_t acc = 0;
  for (int head = blockIdx.x; head < heads; head += gridDim.x) {
    const bf16* kb = K + size_t(head) * cap * D;
    const bf16* vb = V + size_t(head) * cap * D;
    auto start = [&](int t) { return (t * W + warp) * KEYS; };
    auto issue = [&](int t) {
      const int j0 = start(t);
      if (j0 < N) {
        bf16* sk = ring + (t % S) * 2 * KEYS * LD;
#pragma unroll
        for (int i = 0; i < KEYS * 16 / 32; ++i) {
          const int c = lane + 32 * i, r = c / 16, col = (c % 16) * 8;
          if (j0 + r < N) {
            cp16(sk + r * LD + col, kb + size_t(j0 + r) * D + col);
            cp16(sk + KEYS * LD + r * LD + col, vb + size_t(j0 + r) * D + col);
          }
        }
      }
      commit();
    };
    for (int t = 0; t < S - 1; ++t) issue(t);
    for (int t = 0; start(t) < N; ++t) {
      __syncwarp();
      issue(t + S - 1);
      wait_group<S - 1>();
      __syncwarp();
      const bf16* sk = ring + (t % S) * 2 * KEYS * LD;
      consume<KEYS>(sk, sk + KEYS * LD, lane, acc);
    }
    wait_group<0>();
    __syncwarp();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// (b) per-warp ring filled by bulk (TMA) copies of whole rows, one mbarrier per stage.
template <int W, int KEYS, int S>
__global__ void __launch_bounds__(W * 32) warp_bulk(const bf16* K, const bf16* V, int N, int cap,
                                                    uint32_t* out, int /*heads: one block per head*/) {
  extern __shared__ uint4 smem[];
  __shared__ uint64_t bars[W][S];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  bf16* ring = reinterpret_cast<bf16*>(smem) + warp * S * 2 * KEYS * LD;
  const bf16* kb = K + size_t(blockIdx.x) * cap * D;
  const bf16* vb = V + size_t(blockIdx.x) * cap * D;
  if (lane < S) mbar_init(&bars[warp][lane], 1);
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncwarp();
  auto start = [&](int t) { return (t * W + warp) * KEYS; };
  auto issue = [&](int t) {
    const int j0 = start(t);
    if (j0 >= N) return;
    const int rows = min(KEYS, N - j0);
    bf16* sk = ring + (t % S) * 2 * KEYS * LD;
    uint64_t* bar = &bars[warp][t % S];
    if (lane == 0) mbar_expect(bar, rows * D * 2 * 2);
    __syncwarp();
    for (int r = lane; r < 2 * rows; r += 32) {
      const bool isv = r >= rows;
      const int rr = isv ? r - rows : r;
      bulk_copy(sk + (isv ? KEYS * LD : 0) + rr * LD, (isv ? vb : kb) + size_t(j0 + rr) * D, D * 2,
                bar);
    }
  };
  for (int t = 0; t < S - 1; ++t) issue(t);
  uint32_t acc = 0;
  for (int t = 0; start(t) < N; ++t) {
    __syncwarp();
    issue(t + S - 1);
    mbar_wait(&bars[warp][t % S], (t / S) & 1);
    const bf16* sk = ring + (t % S) * 2 * KEYS * LD;
    consume<KEYS>(sk, sk + KEYS * LD, lane, acc);
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// (c) plain vectorized read of the same bytes, many blocks: the read bandwidth peak.
__global__ void plain_read(const uint4* K, const uint4* V, size_t n, uint32_t* out) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint4 a = K[i], b = V[i];
    acc ^= a.x ^ b.y;
  }
  if (acc == 0x12345678u) out[0] = acc;
}

template <typename F>
float time_ms(F launch) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 5; ++i) launch();
  std::vector<float> ts;
  for (int i = 0; i < 30; ++i) {
    cudaEventRecord(a);
    launch();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main() {
  const int cap = 2176;
  bf16 *K, *V;
  uint32_t* out;
  const int maxBH = 928 * 4;
  cudaMalloc(&K, size_t(maxBH) * cap * D * 2);
  cudaMalloc(&V, size_t(maxBH) * cap * D * 2);
  cudaMemset(K, 0, size_t(maxBH) * cap * D * 2);
  cudaMemset(V, 0, size_t(maxBH) * cap * D * 2);
  cudaMalloc(&out, size_t(maxBH) * 256 * 4);
  printf("| B*Hkv | N | variant | blocks/SM | us | TB/s |\n|---|---|---|---|---|---|\n");
  for (int BH : {256, 3712}) {
    const int N = 2125;
    const double bytes = double(BH) * N * D * 2 * 2;
    auto report = [&](const char* name, auto kernel, int threads, size_t smem, int sms = 0) {
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      int per_sm = 0;
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
      const int grid = sms > 0 ? sms * per_sm : BH;
      const float ms = time_ms([&] { kernel<<<grid, threads, smem>>>(K, V, N, cap, out, BH); });
      cudaError_t e = cudaGetLastError();
      printf("| %d | %d | %s, %s SMs | %d | %.1f | %.2f |%s\n", BH, N, name,
             sms > 0 ? std::to_string(sms).c_str() : "all", per_sm, ms * 1e3, bytes / ms / 1e9,
             e == cudaSuccess ? "" : cudaGetErrorString(e));
    };
// W warps per block, KEYS keys per warp tile, S ring stages.
#define RING(W, KEYS, S)                                                  \
  report("ring W" #W " keys" #KEYS " S" #S, warp_ring<W, KEYS, S>, W * 32, \
         size_t(W) * S * 2 * KEYS * LD * 2)
#define BULK(W, KEYS, S)                                                  \
  report("bulk W" #W " keys" #KEYS " S" #S, warp_bulk<W, KEYS, S>, W * 32, \
         size_t(W) * S * 2 * KEYS * LD * 2)
    for (int sms : {16, 24, 32, 40, 48, 64, 96, 132}) {
      report("persistent ring W4 keys16 S3", warp_ring<4, 16, 3>, 128,
             size_t(4) * 3 * 2 * 16 * LD * 2, sms);
    }
    RING(4, 16, 3);
    RING(4, 16, 4);
    RING(8, 16, 3);
    RING(4, 32, 2);
    RING(4, 32, 3);
    RING(4, 8, 6);
    RING(2, 16, 4);
    BULK(4, 16, 3);
    BULK(4, 16, 4);
    BULK(4, 16, 5);
    BULK(4, 32, 3);
    BULK(8, 16, 3);
    BULK(2, 16, 6);
    BULK(2, 32, 4);
    // Same bytes, contiguous: a copy-free peak (whole cap rows, so a little more than N).
    const size_t n16 = size_t(BH) * cap * D * 2 / 16;
    const float ms = time_ms([&] {
      plain_read<<<132 * 8, 512>>>(reinterpret_cast<uint4*>(K), reinterpret_cast<uint4*>(V), n16,
                                   out);
    });
    printf("| %d | %d | plain read (cap rows) | - | %.1f | %.2f |\n", BH, cap, ms * 1e3,
           2.0 * n16 * 16 / ms / 1e9);
  }
  return 0;
}
