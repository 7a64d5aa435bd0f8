// Registers the gard_kernels ops with the PyTorch dispatcher (torch.ops.gard_kernels.*).
//
//   sketch(x, dy, key_in, key_out, k_in, k_out, scale, out, accumulate) -> ()
//       out (+)= scale * (dy @ Sgn_out)^T (x @ Sgn_in), signs from csrc/hash.h; CPU, and CUDA
//       when built WITH_CUDA. Its fake (meta) kernel is registered from Python in native.py.
//   projection(key, d, k) -> Tensor
//       P [d, k] float32 = +-1/sqrt(k), materialised on the CPU for hash-equality tests.
//   cpu_bf16_dot_supported() -> bool
//       Whether bfloat16 inputs on the CPU take the AVX-512 BF16 (vdpbf16ps) path here.
//   set_cpu_bf16_dot(enabled) -> bool
//       Allows or forbids that path (process-wide; returns the previous setting), so tests and
//       benchmarks can run the float fallback on a CPU that has the instructions.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <type_traits>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/sketch_cuda.h"
#endif

namespace gard_kernels {

// Defined in cpu/sketch_cpu.cpp.
void sketch_cpu(const at::Tensor& x, const at::Tensor& dy, uint32_t key_in, uint32_t key_out, int64_t k_in,
                int64_t k_out, double scale, const at::Tensor& out, bool accumulate);
at::Tensor projection_cpu(uint32_t key, int64_t d, int64_t k);
bool cpu_bf16_dot_supported();
bool set_cpu_bf16_dot(bool enabled);

namespace {

// Error messages are assembled here with std::to_string rather than iostreams, and handed to
// TORCH_CHECK as one finished string (which c10 passes through without a stream). On the first GPU
// machine this ran on (torch 2.11+cu130, g++ 13.3) formatting an integer through an ostream
// inside any JIT-built extension crashed the process, a minimal op of three lines too: every
// bad-input error became a segfault. benchmarks/gpu/diagnose_native_errors.sh checks it.
void append(std::string& out, const char* part) { out += part; }
void append(std::string& out, const std::string& part) { out += part; }
void append(std::string& out, at::ScalarType dtype) { out += c10::toString(dtype); }
void append(std::string& out, const at::Device& device) { out += device.str(); }
void append(std::string& out, at::IntArrayRef values) {
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(values[i]);
  }
  out += ']';
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& out, T value) {
  out += std::to_string(value);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

uint32_t checked_key(int64_t key, const char* name) {
  TORCH_CHECK(key >= 0 && key <= static_cast<int64_t>(UINT32_MAX),
              message("gard_kernels: ", name, " must be a 32-bit stream key in [0, 2^32), got ", key));
  return static_cast<uint32_t>(key);
}

void check_sketch_args(const at::Tensor& x, const at::Tensor& dy, int64_t k_in, int64_t k_out, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && dy.dim() == 2,
              message("gard_kernels::sketch: x and dy must be 2-D [N, d] (flatten the leading dims first), got x ",
                      x.sizes(), " and dy ", dy.sizes()));
  TORCH_CHECK(x.size(0) == dy.size(0),
              message("gard_kernels::sketch: x and dy must have the same number of tokens, got x ", x.sizes(),
                      " and dy ", dy.sizes()));
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(),
              message("gard_kernels::sketch: x and dy must share one dtype, got ", x.scalar_type(), " and ",
                      dy.scalar_type()));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              message("gard_kernels::sketch: x and dy must be float32, float16 or bfloat16, got ", dtype));
  TORCH_CHECK(k_in > 0 && k_out > 0,
              message("gard_kernels::sketch: k_in and k_out must be positive, got k_in=", k_in, ", k_out=", k_out));
  TORCH_CHECK(out.scalar_type() == at::kFloat,
              message("gard_kernels::sketch: out must be float32, got ", out.scalar_type()));
  TORCH_CHECK(out.dim() == 2 && out.size(0) == k_out && out.size(1) == k_in,
              message("gard_kernels::sketch: out must be [k_out, k_in] = [", k_out, ", ", k_in, "], got ",
                      out.sizes()));
  TORCH_CHECK(out.is_contiguous(),
              message("gard_kernels::sketch: out must be contiguous, got strides ", out.strides()));
  TORCH_CHECK(x.device() == dy.device() && x.device() == out.device(),
              message("gard_kernels::sketch: x, dy and out must be on one device, got ", x.device(), ", ",
                      dy.device(), " and ", out.device()));
}

// Checks shared by every device's entry point. Returns false when there is nothing to launch
// (N = 0 tokens: out is zeroed unless accumulating).
bool prepare_sketch(const at::Tensor& x, const at::Tensor& dy, int64_t k_in, int64_t k_out, const at::Tensor& out,
                    bool accumulate) {
  check_sketch_args(x, dy, k_in, k_out, out);
  if (x.size(0) == 0) {
    if (!accumulate) out.zero_();
    return false;
  }
  return true;
}

void sketch_cpu_op(const at::Tensor& x, const at::Tensor& dy, int64_t key_in, int64_t key_out, int64_t k_in,
                   int64_t k_out, double scale, const at::Tensor& out, bool accumulate) {
  const uint32_t key_in_u = checked_key(key_in, "key_in");
  const uint32_t key_out_u = checked_key(key_out, "key_out");
  if (!prepare_sketch(x, dy, k_in, k_out, out, accumulate)) return;
  sketch_cpu(x, dy, key_in_u, key_out_u, k_in, k_out, scale, out, accumulate);
}

#ifdef WITH_CUDA
int dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    default:
      return 2;
  }
}

void sketch_cuda_op(const at::Tensor& x, const at::Tensor& dy, int64_t key_in, int64_t key_out, int64_t k_in,
                    int64_t k_out, double scale, const at::Tensor& out, bool accumulate) {
  const uint32_t key_in_u = checked_key(key_in, "key_in");
  const uint32_t key_out_u = checked_key(key_out, "key_out");
  if (!prepare_sketch(x, dy, k_in, k_out, out, accumulate)) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const int dtype = dtype_code(x.scalar_type());
  const int64_t partials = sketch_cuda_partials(x.size(0), k_in, k_out, dtype, device);
  TORCH_CHECK(partials != 0, message("gard_kernels::sketch: k_in=", k_in, " and k_out=", k_out,
              " need more shared memory than this GPU has; use smaller sketches or the torch backend"));
  TORCH_CHECK(partials > 0, message("gard_kernels::sketch: CUDA error while sizing the launch: ",
              cudaGetErrorString(cudaGetLastError())));
  // Freed when this returns; the caching allocator keeps it for the kernels already on the stream.
  at::Tensor workspace = at::empty({partials, k_out * k_in}, out.options());
  const cudaError_t err =
      sketch_cuda(x.data_ptr(), dy.data_ptr(), dtype, x.size(0), x.size(1), dy.size(1), x.stride(0), x.stride(1),
                  dy.stride(0), dy.stride(1), key_in_u, key_out_u, k_in, k_out, scale, out.data_ptr<float>(),
                  accumulate, workspace.data_ptr<float>(), partials, device,
                  c10::cuda::getCurrentCUDAStream(device).stream());
  TORCH_CHECK(err == cudaSuccess, message("gard_kernels::sketch: CUDA launch failed: ", cudaGetErrorString(err)));
}
#endif

at::Tensor projection_op(int64_t key, int64_t d, int64_t k) {
  TORCH_CHECK(d > 0 && k > 0, message("gard_kernels::projection: d and k must be positive, got d=", d, ", k=", k));
  return projection_cpu(checked_key(key, "key"), d, k);
}

}  // namespace
}  // namespace gard_kernels

TORCH_LIBRARY(gard_kernels, m) {
  m.def(
      "sketch(Tensor x, Tensor dy, int key_in, int key_out, int k_in, int k_out, float scale, Tensor(a!) out, "
      "bool accumulate) -> ()");
  // No tensor arguments, so a catch-all kernel: it always runs on the CPU.
  m.def("projection(int key, int d, int k) -> Tensor", &gard_kernels::projection_op);
  m.def("cpu_bf16_dot_supported() -> bool", &gard_kernels::cpu_bf16_dot_supported);
  m.def("set_cpu_bf16_dot(bool enabled) -> bool", &gard_kernels::set_cpu_bf16_dot);
}

TORCH_LIBRARY_IMPL(gard_kernels, CPU, m) { m.impl("sketch", &gard_kernels::sketch_cpu_op); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(gard_kernels, CUDA, m) { m.impl("sketch", &gard_kernels::sketch_cuda_op); }
#endif
