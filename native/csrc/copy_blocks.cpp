// Gather an engine's paged KV blocks into the store's contiguous payload
// layout and scatter them back: the CPU kernels and the Python binding.
//
// The Python side (native/paged.py) validates everything and raises typed
// errors; the checks here are a backstop so a bad call can never write
// outside the tensors it was given.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "copy_blocks.h"

namespace kvstore_native {
namespace {

constexpr int64_t kMinBytesPerThread = 1 << 20;  // below this a thread costs more than it saves

struct Batch {
  std::vector<Layer> layers;
  Geometry g;
};

Batch describe(const std::vector<at::Tensor>& layers, const at::Tensor& ids,
               const at::Tensor& staging) {
  TORCH_CHECK(!layers.empty(), "no layers");
  const auto& first = layers[0];
  TORCH_CHECK(first.dim() == 5, "layers must be 5-D [kv, blocks, block_size, heads, head_dim]");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "block ids must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(staging.is_contiguous(), "staging buffer must be contiguous");
  Batch b;
  b.g.n = ids.numel();
  b.g.layers = static_cast<int32_t>(layers.size());
  b.g.kv_factor = static_cast<int32_t>(first.size(0));
  b.g.block_size = static_cast<int32_t>(first.size(2));
  b.g.heads = static_cast<int32_t>(first.size(3));
  b.g.head_dim = static_cast<int32_t>(first.size(4));
  b.g.elem = static_cast<int32_t>(first.element_size());
  b.g.piece_bytes = int64_t(b.g.block_size) * b.g.heads * b.g.head_dim * b.g.elem;
  const int64_t e = b.g.elem;
  for (const auto& t : layers) {
    TORCH_CHECK(t.sizes() == first.sizes(), "layers differ in shape");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "layers differ in dtype");
    TORCH_CHECK(t.device() == first.device(), "layers differ in device");
    Layer l{};
    l.base = static_cast<char*>(t.data_ptr());
    for (int d = 0; d < 5; ++d) l.stride[d] = t.stride(d) * e;
    l.contiguous = l.stride[4] == e && l.stride[3] == e * b.g.head_dim &&
                   l.stride[2] == e * b.g.head_dim * b.g.heads;
    b.layers.push_back(l);
  }
  const int64_t want = b.g.n * b.g.layers * b.g.kv_factor * b.g.piece_bytes;
  TORCH_CHECK(staging.numel() * staging.element_size() == want, "staging buffer is ",
              staging.numel() * staging.element_size(), " bytes, the batch needs ", want);
  return b;
}

void check_ids(const at::Tensor& ids_cpu, int64_t num_blocks) {
  const int64_t* p = ids_cpu.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids_cpu.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < num_blocks, "block id ", p[i], " out of range [0, ",
                num_blocks, ")");
}

// One piece: one block of one layer, K or V: [block_size, heads, head_dim].
inline void copy_piece(char* cache, const Layer& l, char* stage, const Geometry& g, bool gather) {
  if (l.contiguous) {
    gather ? std::memcpy(stage, cache, g.piece_bytes) : std::memcpy(cache, stage, g.piece_bytes);
    return;
  }
  const int64_t row = int64_t(g.head_dim) * g.elem;
  for (int32_t t = 0; t < g.block_size; ++t) {
    for (int32_t h = 0; h < g.heads; ++h) {
      char* c = cache + t * l.stride[2] + h * l.stride[3];
      char* s = stage + (int64_t(t) * g.heads + h) * row;
      if (l.stride[4] == g.elem) {
        gather ? std::memcpy(s, c, row) : std::memcpy(c, s, row);
        continue;
      }
      for (int32_t d = 0; d < g.head_dim; ++d, s += g.elem) {
        char* ce = c + d * l.stride[4];
        gather ? std::memcpy(s, ce, g.elem) : std::memcpy(ce, s, g.elem);
      }
    }
  }
}

void copy_cpu(const Batch& b, const int64_t* ids, char* staging, bool gather, int64_t threads) {
  const Geometry& g = b.g;
  const int64_t items = g.n * g.layers * g.kv_factor;
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item % g.kv_factor;
      const int64_t il = item / g.kv_factor;
      const Layer& l = b.layers[il % g.layers];
      char* cache = l.base + k * l.stride[0] + ids[il / g.layers] * l.stride[1];
      copy_piece(cache, l, staging + item * g.piece_bytes, g, gather);
    }
  };
  const int64_t by_size = std::max<int64_t>(1, items * g.piece_bytes / kMinBytesPerThread);
  const int64_t t = std::max<int64_t>(1, std::min({threads, items, by_size}));
  std::vector<std::thread> workers;
  workers.reserve(t - 1);
  for (int64_t w = 1; w < t; ++w)
    workers.emplace_back(run, items * w / t, items * (w + 1) / t);
  run(0, items / t);
  for (auto& w : workers) w.join();
}

#ifdef KVSTORE_WITH_CUDA
void cuda_check(int code, const char* what) {
  TORCH_CHECK(code == 0, what, ": ", kvstore_cuda_error_string(code));
}

// The widest access (16, 8, 4, 2 or 1 bytes) every address and stride allows.
int vector_bytes(const Batch& b, const char* staging) {
  uint64_t bits = reinterpret_cast<uint64_t>(staging) | uint64_t(b.g.piece_bytes) | 16;
  for (const auto& l : b.layers) {
    bits |= reinterpret_cast<uint64_t>(l.base) | uint64_t(l.stride[0]) | uint64_t(l.stride[1]);
    if (l.contiguous) continue;
    if (l.stride[4] != b.g.elem) bits |= uint64_t(b.g.elem);
    bits |= uint64_t(l.stride[2]) | uint64_t(l.stride[3]) | uint64_t(b.g.head_dim) * b.g.elem;
  }
  return static_cast<int>(bits & (~bits + 1));  // lowest set bit
}

void copy_cuda(const Batch& b, const at::Tensor& ids, const at::Tensor& staging, bool gather,
               int64_t stream) {
  const auto device = ids.device();
  TORCH_CHECK(device.is_cuda(), "block ids must be on the caches' device");
  char* stage = static_cast<char*>(staging.data_ptr());
  if (!staging.is_cuda()) {  // pinned host memory, written across PCIe by the kernel
    void* dev = nullptr;
    cuda_check(kvstore_cuda_device_pointer(stage, &dev),
               "staging buffer is not pinned host memory the GPU can map");
    stage = static_cast<char*>(dev);
  }
  const int64_t words = sizeof(Layer) / sizeof(int64_t);
  auto table = at::empty({int64_t(b.layers.size()), words}, at::kLong);
  std::memcpy(table.data_ptr(), b.layers.data(), b.layers.size() * sizeof(Layer));
  auto table_dev = table.to(device);
  cuda_check(kvstore_cuda_copy_blocks(reinterpret_cast<const Layer*>(table_dev.data_ptr()),
                                      ids.data_ptr<int64_t>(), stage, b.g, gather ? 1 : 0,
                                      vector_bytes(b, stage), reinterpret_cast<void*>(stream)),
             "copy kernel launch failed");
}
#endif

}  // namespace

// ids: int64 block ids on the caches' device; for CUDA caches also pass the
// same ids on the CPU (ids_cpu) so the range check reads host memory.
void copy_blocks(const std::vector<at::Tensor>& layers, const at::Tensor& ids,
                 const at::Tensor& ids_cpu, const at::Tensor& staging, bool gather,
                 int64_t threads, int64_t stream) {
  const Batch b = describe(layers, ids, staging);
  TORCH_CHECK(ids_cpu.device().is_cpu() && ids_cpu.numel() == ids.numel(),
              "ids_cpu must be the block ids on the CPU");
  check_ids(ids_cpu, layers[0].size(1));
  if (b.g.n == 0) return;
  if (layers[0].device().is_cpu()) {
    TORCH_CHECK(staging.device().is_cpu(), "CPU caches need a CPU staging buffer");
    copy_cpu(b, ids.data_ptr<int64_t>(), static_cast<char*>(staging.data_ptr()), gather, threads);
    return;
  }
#ifdef KVSTORE_WITH_CUDA
  copy_cuda(b, ids, staging, gather, stream);
#else
  TORCH_CHECK(false, "this build of the copy extension has no CUDA kernels");
#endif
}

bool has_cuda() {
#ifdef KVSTORE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace kvstore_native

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("copy_blocks", &kvstore_native::copy_blocks, "gather (or scatter) paged KV blocks",
        py::arg("layers"), py::arg("ids"), py::arg("ids_cpu"), py::arg("staging"),
        py::arg("gather"), py::arg("threads"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("has_cuda", &kvstore_native::has_cuda);
}
