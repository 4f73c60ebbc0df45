// Shared between the CPU binding and the CUDA kernels: one engine KV layer as
// the kernels see it, and the geometry of one batch. Plain C types only, so
// the .cu file builds without torch's headers.
#pragma once
#include <cstdint>

namespace kvstore_native {

// One layer of a paged cache, viewed as [kv_factor, num_blocks, block_size,
// num_kv_heads, head_dim]; strides are in bytes, so any dtype and any view
// (a slice of a larger tensor, a permuted NHD/HND cache) is described.
struct Layer {
  char* base;
  int64_t stride[5];
  int32_t contiguous;  // one block's [block_size, heads, head_dim] is one run
  int32_t pad;
};

// The batch: n blocks x layers x kv_factor pieces, each `piece_bytes` long
// in the staging buffer, in that order (the store's block payload layout).
struct Geometry {
  int64_t n;
  int32_t layers;
  int32_t kv_factor;
  int32_t block_size;
  int32_t heads;
  int32_t head_dim;
  int32_t elem;  // bytes per element
  int64_t piece_bytes;
};

}  // namespace kvstore_native

#ifdef KVSTORE_WITH_CUDA
// Implemented in copy_blocks_cuda.cu. Each returns 0 or a cudaError_t value.
extern "C" int kvstore_cuda_copy_blocks(const kvstore_native::Layer* layers_dev,
                                        const int64_t* ids_dev, char* staging_dev,
                                        kvstore_native::Geometry geometry, int gather,
                                        int vector_bytes, void* stream);
extern "C" int kvstore_cuda_device_pointer(void* host, void** device);
extern "C" const char* kvstore_cuda_error_string(int code);
#endif
