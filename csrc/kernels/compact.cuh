// Row moves along the token axis, for gkv::compact_, gkv::write_slot_ and gkv::gather_tokens.
// Rows are moved as raw bytes in vectors of `Vec` (16 bytes when sizes and addresses allow), so
// one kernel serves every dtype. No torch headers: raw pointers, sizes, byte strides, a stream, a
// cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common.cuh"

namespace gkv::kernels {

// Bits of the flags word that check_idx and gather_rows OR into.
constexpr int kIdxOutOfRange = 1;  // some idx value outside [0, n)
constexpr int kIdxBehind = 2;      // some idx[t] < t: an in-place walk could read a written slot

// idx [rows, K] int64, contiguous.
__global__ void check_idx_kernel(const int64_t* __restrict__ idx, int64_t total, int64_t K,
                                 int64_t n, int* __restrict__ flags) {
  int local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = idx[i];
    if (v < 0 || v >= n) local |= kIdxOutOfRange;
    if (v < i % K) local |= kIdxBehind;
  }
  local = __reduce_or_sync(0xffffffffu, local);
  if ((threadIdx.x & 31) == 0 && local != 0) atomicOr(flags, local);
}

// Writes into flags[0] the kIdx* bits of idx [rows, K] against n; flags must start at 0.
inline cudaError_t check_idx(const int64_t* idx, int64_t rows, int64_t K, int64_t n, int* flags,
                             cudaStream_t stream) {
  const int64_t total = rows * K;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, threads), 1024));
  check_idx_kernel<<<blocks, threads, 0, stream>>>(idx, total, K, n, flags);
  return cudaGetLastError();
}

// dst[r, t, :] = src[r, idx[r, t], :] for r = b * H + h. src rows are addressed with byte
// strides (b, h, n); dst [rows, K, row] is contiguous. An out-of-range idx sets kIdxOutOfRange
// and writes zeros (the caller raises). One thread per vector of an output row.
template <typename Vec>
__global__ void gather_rows_kernel(const char* __restrict__ src, int64_t stride_b,
                                   int64_t stride_h, int64_t stride_n, int64_t H, int64_t n,
                                   const int64_t* __restrict__ idx, int64_t K, int64_t row_vecs,
                                   int64_t total, Vec* __restrict__ dst, int* __restrict__ flags) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rt = e / row_vecs;  // (r, t) flattened
    const int64_t v = e - rt * row_vecs;
    const int64_t r = rt / K;
    const int64_t s = idx[rt];
    Vec val{};
    if (s >= 0 && s < n) {
      const char* row = src + (r / H) * stride_b + (r % H) * stride_h + s * stride_n;
      val = reinterpret_cast<const Vec*>(row)[v];
    } else {
      atomicOr(flags, kIdxOutOfRange);
    }
    dst[e] = val;
  }
}

// src_vecs [rows, ...] with byte strides (b, h, n); row_bytes a multiple of sizeof(Vec), and
// src, the strides and dst aligned to it. dst [rows, K, row_bytes] contiguous.
template <typename Vec>
cudaError_t gather_rows(const void* src, int64_t stride_b, int64_t stride_h, int64_t stride_n,
                        int64_t H, int64_t n, const int64_t* idx, int64_t rows, int64_t K,
                        int64_t row_bytes, void* dst, int* flags, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t total = rows * K * row_vecs;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, threads), 1 << 16));
  gather_rows_kernel<Vec><<<blocks, threads, 0, stream>>>(
      static_cast<const char*>(src), stride_b, stride_h, stride_n, H, n, idx, K, row_vecs, total,
      static_cast<Vec*>(dst), flags);
  return cudaGetLastError();
}

// In-place compaction of up to two buffers base[y] [rows, C, row] (contiguous), valid when
// idx[r, t] >= t for every t (true of strictly ascending idx, which select_keep makes): slot t
// takes the old slot idx[r, t]. Blocks: (row r, buffer y, group z of `cols` vector columns). A
// block walks t upwards in chunks: it reads a whole chunk, waits at a barrier, then writes it.
// Any later read of a column is of a slot idx[t'] >= t' beyond every slot written so far in that
// column, so it still holds its old value. Slots with idx[t] == t are not copied; an idx outside
// [t, C) is skipped, so a broken promise cannot read or write out of bounds.
constexpr int kCompactThreads = 512;
constexpr int kCompactUnroll = 4;

template <typename Vec>
__global__ void __launch_bounds__(kCompactThreads)
    compact_rows_kernel(Vec* __restrict__ base0, Vec* __restrict__ base1, int C, int row_vecs,
                        int cols, const int64_t* __restrict__ idx, int K) {
  Vec* head = (blockIdx.y == 0 ? base0 : base1) + int64_t(blockIdx.x) * C * row_vecs +
              blockIdx.z * cols;
  const int64_t* head_idx = idx + int64_t(blockIdx.x) * K;
  const int total = K * cols;
  for (int start = 0; start < total; start += kCompactThreads * kCompactUnroll) {
    Vec val[kCompactUnroll];
    int dst[kCompactUnroll];
#pragma unroll
    for (int u = 0; u < kCompactUnroll; ++u) {
      const int e = start + u * kCompactThreads + threadIdx.x;
      dst[u] = -1;
      if (e < total) {
        const int t = e / cols, v = e - t * cols;
        const int64_t s = head_idx[t];
        if (s > t && s < C) {
          val[u] = head[int(s) * row_vecs + v];
          dst[u] = t * row_vecs + v;
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kCompactUnroll; ++u) {
      if (dst[u] >= 0) head[dst[u]] = val[u];
    }
  }
}

// base0/base1 [rows, C, row_bytes] contiguous (base1 may be null: one buffer), idx [rows, K]
// with idx[r, t] >= t; row_bytes a multiple of sizeof(Vec), bases aligned to it; C * row_bytes
// below 2^31 (the caller checks it).
template <typename Vec>
cudaError_t compact_rows(void* base0, void* base1, int64_t rows, int64_t C, int64_t row_bytes,
                         const int64_t* idx, int64_t K, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  if (rows == 0 || K == 0 || row_vecs == 0) return cudaSuccess;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // Whole token rows per block (a warp's reads coalesce), split into column groups of at least
  // 64 bytes only when there are too few rows to fill the device twice over.
  const int64_t buffers = base1 == nullptr ? 1 : 2;
  int64_t groups = 1;
  while (rows * buffers * groups < 2 * sms && row_vecs % (2 * groups) == 0 &&
         row_vecs / (2 * groups) * static_cast<int64_t>(sizeof(Vec)) >= 64)
    groups *= 2;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(buffers),
                  static_cast<unsigned>(groups));
  compact_rows_kernel<Vec><<<grid, kCompactThreads, 0, stream>>>(
      static_cast<Vec*>(base0), static_cast<Vec*>(base1), static_cast<int>(C),
      static_cast<int>(row_vecs), static_cast<int>(row_vecs / groups), idx,
      static_cast<int>(K));
  return cudaGetLastError();
}

// One token row per (b, head) of a [B, heads, slots, row_bytes] buffer, written at *slot.
struct SlotWrite {
  void* dst;            // [B * heads, slots, row_bytes] contiguous
  const void* src;      // row (b, h) at b * src_b + h * src_h bytes
  int64_t src_b, src_h;
  int64_t heads, slots;
  const int64_t* slot;  // one value, read on the device
};

struct WriteSlotParams {
  SlotWrite part[3];        // K, V, and (when parts == 3) the query ring
  int parts;
  int64_t B, row_bytes;
  int32_t* pos;             // [B * heads of K, slots of K]: written with K
  const int32_t* new_pos;   // element (b, h) at b * pos_b + h * pos_h
  int64_t pos_b, pos_h;
};

// One Vec word of a row per thread; the first word of each K row also writes pos. A slot outside
// [0, slots) writes nothing: the op documents it (a check would read the slot to the host).
template <typename Vec>
__global__ void write_slot_kernel(WriteSlotParams p) {
  chain_wait();
  chain_release();
  const int64_t words = p.row_bytes / int64_t(sizeof(Vec));
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t local = e;
    int which = 0;
    while (which < p.parts && local >= p.B * p.part[which].heads * words) {
      local -= p.B * p.part[which].heads * words;
      ++which;
    }
    if (which == p.parts) return;
    const SlotWrite& w = p.part[which];
    const int64_t slot = *w.slot;
    if (slot < 0 || slot >= w.slots) continue;
    const int64_t row = local / words, word = local - row * words;
    const int64_t b = row / w.heads, h = row - b * w.heads;
    const auto* src = reinterpret_cast<const Vec*>(static_cast<const char*>(w.src) + b * w.src_b +
                                                   h * w.src_h);
    auto* dst = reinterpret_cast<Vec*>(static_cast<char*>(w.dst) +
                                       (row * w.slots + slot) * p.row_bytes);
    dst[word] = src[word];
    if (which == 0 && word == 0) p.pos[row * w.slots + slot] = p.new_pos[b * p.pos_b + h * p.pos_h];
  }
}

template <typename Vec>
cudaError_t write_slot(const WriteSlotParams& p, cudaStream_t stream) {
  int64_t total = 0;
  for (int i = 0; i < p.parts; ++i) total += p.B * p.part[i].heads;
  total *= p.row_bytes / int64_t(sizeof(Vec));
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, threads), 65536));
  return launch_chained(write_slot_kernel<Vec>, blocks, threads, 0, stream, p);
}

}  // namespace gkv::kernels
