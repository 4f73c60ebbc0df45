// CUDA kernels of the copy extension: one launch per batch moves every
// (block, layer, K/V) piece between an engine's paged caches and a staging
// buffer. The staging buffer may be device memory or pinned host memory; in
// the second case the kernel's loads and stores cross PCIe directly.
#include <cuda_runtime.h>

#include <cstdint>

#include "copy_blocks.h"

namespace {

using kvstore_native::Geometry;
using kvstore_native::Layer;

constexpr int kThreads = 256;
constexpr int kMinBlocksPerSm = 2;  // at most 128 registers: no spills at 16-byte accesses
constexpr int kUnroll = 4;  // loads in flight per thread before the stores

// Byte offset of access unit `u` of a piece inside the cache, for a layer
// whose piece is not one contiguous run: rows of head_dim elements, each row
// either contiguous (unit stride V) or element-strided (V == element size).
template <int V>
__device__ __forceinline__ int64_t strided_offset(const Layer& l, const Geometry& g, int u) {
  const bool dense_row = l.stride[4] == g.elem;
  const int per_row = dense_row ? g.head_dim * g.elem / V : g.head_dim;
  const int row = u / per_row;
  const int in_row = u - row * per_row;
  const int t = row / g.heads;
  const int h = row - t * g.heads;
  return t * l.stride[2] + h * l.stride[3] + in_row * (dense_row ? int64_t(V) : l.stride[4]);
}

template <int V>
struct alignas(V) Unit {
  unsigned char b[V];
};

// Moves one piece, `units` accesses of V bytes; `offset(u)` places access u
// in the cache. kUnroll loads are issued before their stores so that reads
// across PCIe (scatter from pinned host memory) overlap.
template <int V, bool Gather, typename Offset>
__device__ __forceinline__ void copy_piece(char* cache, Unit<V>* stage, int units, Offset offset) {
  using U = Unit<V>;
  for (int base = threadIdx.x; base < units; base += kThreads * kUnroll) {
    U tmp[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int u = base + j * kThreads;
      if (u < units) tmp[j] = Gather ? *reinterpret_cast<const U*>(cache + offset(u)) : stage[u];
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int u = base + j * kThreads;
      if (u < units) {
        if (Gather) {
          stage[u] = tmp[j];
        } else {
          *reinterpret_cast<U*>(cache + offset(u)) = tmp[j];
        }
      }
    }
  }
}

template <int V, bool Gather>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    copy_kernel(const Layer* __restrict__ layers, const int64_t* __restrict__ ids,
                char* __restrict__ staging, Geometry g) {
  const int64_t item = blockIdx.x;  // ((block * layers) + layer) * kv_factor + k
  const int64_t k = item % g.kv_factor;
  const int64_t il = item / g.kv_factor;
  const Layer l = layers[il % g.layers];
  char* cache = l.base + k * l.stride[0] + ids[il / g.layers] * l.stride[1];
  auto* stage = reinterpret_cast<Unit<V>*>(staging + item * g.piece_bytes);
  const int units = static_cast<int>(g.piece_bytes / V);
  if (l.contiguous) {
    copy_piece<V, Gather>(cache, stage, units, [](int u) { return int64_t(u) * V; });
  } else {
    copy_piece<V, Gather>(cache, stage, units,
                          [&](int u) { return strided_offset<V>(l, g, u); });
  }
}

template <int V>
cudaError_t launch(const Layer* layers, const int64_t* ids, char* staging, Geometry g,
                   int gather, cudaStream_t stream) {
  const int64_t items = g.n * g.layers * g.kv_factor;
  if (items == 0) return cudaSuccess;
  if (items > 0x7fffffffLL || g.piece_bytes / V > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(items));
  if (gather) {
    copy_kernel<V, true><<<grid, kThreads, 0, stream>>>(layers, ids, staging, g);
  } else {
    copy_kernel<V, false><<<grid, kThreads, 0, stream>>>(layers, ids, staging, g);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int kvstore_cuda_copy_blocks(const Layer* layers_dev, const int64_t* ids_dev,
                                        char* staging_dev, Geometry g, int gather,
                                        int vector_bytes, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (vector_bytes) {
    case 16: return launch<16>(layers_dev, ids_dev, staging_dev, g, gather, s);
    case 8: return launch<8>(layers_dev, ids_dev, staging_dev, g, gather, s);
    case 4: return launch<4>(layers_dev, ids_dev, staging_dev, g, gather, s);
    case 2: return launch<2>(layers_dev, ids_dev, staging_dev, g, gather, s);
    case 1: return launch<1>(layers_dev, ids_dev, staging_dev, g, gather, s);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" int kvstore_cuda_device_pointer(void* host, void** device) {
  cudaError_t err = cudaHostGetDevicePointer(device, host, 0);
  if (err != cudaSuccess) cudaGetLastError();  // clear it: the caller raises instead
  return err;
}

extern "C" const char* kvstore_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
