// Host entry points of cuda/sketch_cuda.cu, shared by the .cu and bindings.cpp so the two can
// never disagree. Plain CUDA runtime types only: nvcc compiles the .cu without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gard_kernels {

// Number of partial sketches sketch_cuda writes: the caller allocates a float32 workspace of
// sketch_cuda_partials(...) * k_out * k_in elements on `device`. Returns 0 when k_in and k_out
// are too large for the kernel's shared memory, -1 on a CUDA error or unknown dtype.
// dtype: 0 float32, 1 float16, 2 bfloat16.
int64_t sketch_cuda_partials(int64_t n, int64_t k_in, int64_t k_out, int dtype, int device);

// out (+)= scale * (dy @ Sgn_out)^T (x @ Sgn_in), enqueued on `stream`.
// x [n, d_in] and dy [n, d_out] on `device`, one dtype (code as above), any element strides, n > 0;
// out [k_out, k_in] float32 contiguous; accumulate=false overwrites out without reading it;
// workspace: float32 [partials, k_out * k_in] with partials from sketch_cuda_partials.
cudaError_t sketch_cuda(const void* x, const void* dy, int dtype, int64_t n, int64_t d_in, int64_t d_out,
                        int64_t x_stride_row, int64_t x_stride_col, int64_t dy_stride_row, int64_t dy_stride_col,
                        uint32_t key_in, uint32_t key_out, int64_t k_in, int64_t k_out, double scale, float* out,
                        bool accumulate, float* workspace, int64_t partials, int device, cudaStream_t stream);

}  // namespace gard_kernels
