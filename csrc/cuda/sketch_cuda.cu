// Fused gradient sketch on CUDA: out (+)= scale * (dy @ Sgn_out)^T (x @ Sgn_in).
//
// Compiles with plain nvcc, without torch headers (CI: csrc/check_cuda_compiles.sh); bindings.cpp
// calls the two host functions at the bottom with raw pointers.
//
// One thread block per tile of `bt` tokens (grid-stride over tiles). Per tile and side, the
// block walks the features in chunks of kChunk: it stages x[tile, chunk] as float32 in shared
// memory, hashes the sign chunk Sgn[chunk, kp] into shared memory next to it, and each thread
// accumulates kColsPerThread columns of one token's projection:
//     xp[bt, kp_in] = x[tile] @ Sgn_in      dp[bt, kp_out] = dy[tile] @ Sgn_out      (shared, fp32)
// then the block adds dp^T xp into its own partial S[k_out, k_in] in global memory. A second
// kernel sums the partials in block order and writes out, so results are deterministic for a
// given device (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../hash.h"
#include "sketch_cuda.h"

namespace gard_kernels {
namespace {

constexpr int kThreads = 256;
// Features per staged chunk: one warp reads 32 consecutive features of one token (coalesced).
constexpr int kChunk = 32;
// Padding column that spreads a token's staged row over shared-memory banks.
constexpr int kChunkStride = kChunk + 1;
// Sketch columns one thread accumulates in registers per pass (two float4 sign loads).
constexpr int kColsPerThread = 8;
// Shared memory the launcher aims to stay under before shrinking the token tile.
constexpr size_t kSmemTarget = 96 * 1024;

// Must match bindings.cpp.
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// One side of the op (x with Sgn_in, or dy with Sgn_out).
struct Side {
  const void* data;  // [n, d] elements of the input dtype
  int64_t stride_row, stride_col;  // in elements
  int64_t d;
  int k, kp;  // sketch width and its padding to a multiple of the pass width
  uint32_t key;
};

// The token tile and the shared-memory layout that follows from it.
struct Plan {
  int bt;  // tokens per tile: 128, 64 or 32
  int kp_in, kp_out;
  size_t smem;  // bytes: xs [bt, kChunkStride] | sg [kChunk, max kp] | xp [bt, kp_in] | dp [bt, kp_out]
  int64_t tiles;
};

__host__ __device__ inline int pass_cols(int bt) { return (kThreads / bt) * kColsPerThread; }

inline int round_up(int a, int b) { return (a + b - 1) / b * b; }

// proj[bt, kp] = data[t0 : t0 + bt] @ Sgn (rows past n count as zeros).
// Ends with a barrier, so proj is complete and xs/sg are free when it returns.
template <typename T>
__device__ void project_tile(const Side& s, int64_t t0, int64_t n, int bt, float* xs, float* sg, float* proj) {
  const int tid = threadIdx.x;
  // Threads of a warp hold consecutive tokens and one column group: sign reads broadcast and the
  // padded xs rows put the 32 tokens' reads in 32 different banks.
  const int token = tid % bt;
  const int col0 = (tid / bt) * kColsPerThread;
  const int cols_per_pass = pass_cols(bt);
  const T* base = static_cast<const T*>(s.data);

  for (int i = tid; i < bt * s.kp; i += kThreads) proj[i] = 0.0f;
  __syncthreads();
  for (int64_t c0 = 0; c0 < s.d; c0 += kChunk) {
    for (int i = tid; i < bt * kChunk; i += kThreads) {
      const int t = i / kChunk;
      const int j = i % kChunk;
      const int64_t row = t0 + t;
      const int64_t feat = c0 + j;
      xs[t * kChunkStride + j] =
          (row < n && feat < s.d) ? to_float(base[row * s.stride_row + feat * s.stride_col]) : 0.0f;
    }
    for (int i = tid; i < kChunk * s.kp; i += kThreads) {
      const int j = i / s.kp;
      const int c = i % s.kp;
      const int64_t feat = c0 + j;
      sg[i] = (c < s.k && feat < s.d) ? sign_value(s.key, static_cast<uint32_t>(feat), static_cast<uint32_t>(c)) : 0.0f;
    }
    __syncthreads();
    const float* xs_row = xs + token * kChunkStride;
    for (int c_base = col0; c_base < s.kp; c_base += cols_per_pass) {
      float acc[kColsPerThread] = {};
#pragma unroll 8
      for (int j = 0; j < kChunk; ++j) {
        const float a = xs_row[j];
        const float4 b0 = *reinterpret_cast<const float4*>(sg + j * s.kp + c_base);
        const float4 b1 = *reinterpret_cast<const float4*>(sg + j * s.kp + c_base + 4);
        acc[0] = fmaf(a, b0.x, acc[0]);
        acc[1] = fmaf(a, b0.y, acc[1]);
        acc[2] = fmaf(a, b0.z, acc[2]);
        acc[3] = fmaf(a, b0.w, acc[3]);
        acc[4] = fmaf(a, b1.x, acc[4]);
        acc[5] = fmaf(a, b1.y, acc[5]);
        acc[6] = fmaf(a, b1.z, acc[6]);
        acc[7] = fmaf(a, b1.w, acc[7]);
      }
      float* dst = proj + token * s.kp + c_base;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) dst[c] += acc[c];
    }
    __syncthreads();
  }
}

// partials[blockIdx.x, k_out, k_in] = sum over this block's tiles of dp^T xp (unscaled).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sketch_partials_kernel(Side in, Side out, int64_t n, int bt, int64_t tiles, float* partials) {
  extern __shared__ float4 smem_f4[];
  float* xs = reinterpret_cast<float*>(smem_f4);
  float* sg = xs + bt * kChunkStride;
  float* xp = sg + kChunk * (in.kp > out.kp ? in.kp : out.kp);
  float* dp = xp + bt * in.kp;
  const int count = out.k * in.k;
  // Each thread owns the same partial entries for every tile: no atomics, no races.
  float* part = partials + static_cast<int64_t>(blockIdx.x) * count;
  for (int e = threadIdx.x; e < count; e += kThreads) part[e] = 0.0f;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t t0 = tile * bt;
    project_tile<T>(in, t0, n, bt, xs, sg, xp);
    project_tile<T>(out, t0, n, bt, xs, sg, dp);
    for (int e = threadIdx.x; e < count; e += kThreads) {
      const int o = e / in.k;
      const int i = e % in.k;
      float sum = 0.0f;
      for (int t = 0; t < bt; ++t) sum = fmaf(dp[t * out.kp + o], xp[t * in.kp + i], sum);
      part[e] += sum;
    }
    // The next tile zeroes xp and dp.
    __syncthreads();
  }
}

// out[e] (+)= scale * sum_p partials[p, e], summed in p order.
__global__ void sketch_reduce_kernel(const float* partials, int64_t parts, int count, double scale, float* out,
                                     bool accumulate) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= count) return;
  float sum = 0.0f;
  for (int64_t p = 0; p < parts; ++p) sum += partials[p * count + e];
  const float value = static_cast<float>(scale * static_cast<double>(sum));
  // Overwriting never reads out, which may hold NaN.
  out[e] = accumulate ? out[e] + value : value;
}

template <typename T>
const void* partials_kernel() {
  return reinterpret_cast<const void*>(&sketch_partials_kernel<T>);
}

const void* partials_kernel_for(int dtype) {
  switch (dtype) {
    case kFloat32:
      return partials_kernel<float>();
    case kFloat16:
      return partials_kernel<__half>();
    case kBFloat16:
      return partials_kernel<__nv_bfloat16>();
    default:
      return nullptr;
  }
}

// Largest tile (128, 64, then 32 tokens) whose shared memory fits; bt = 0 when none does.
cudaError_t make_plan(int64_t n, int64_t k_in, int64_t k_out, int device, Plan* plan) {
  int smem_max = 0;
  cudaError_t err = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  plan->bt = 0;
  // Far beyond any shared memory; also keeps the int arithmetic below from overflowing.
  if (k_in > (1 << 20) || k_out > (1 << 20)) return cudaSuccess;
  for (int bt = 128; bt >= 32; bt /= 2) {
    const int kp_in = round_up(static_cast<int>(k_in), pass_cols(bt));
    const int kp_out = round_up(static_cast<int>(k_out), pass_cols(bt));
    const int kp_max = kp_in > kp_out ? kp_in : kp_out;
    const size_t floats = static_cast<size_t>(bt) * (kChunkStride + kp_in + kp_out) + size_t{kChunk} * kp_max;
    const size_t smem = floats * sizeof(float);
    if (smem <= static_cast<size_t>(smem_max) && (smem <= kSmemTarget || bt == 32)) {
      *plan = Plan{bt, kp_in, kp_out, smem, (n + bt - 1) / bt};
      return cudaSuccess;
    }
  }
  return cudaSuccess;
}

// Blocks to launch: as many as the device keeps resident, at most one per tile.
cudaError_t grid_size(const Plan& plan, int dtype, int device, int64_t* grid) {
  const void* kernel = partials_kernel_for(dtype);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  const int smem = static_cast<int>(plan.smem);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int sms = 0;
  int per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  *grid = plan.tiles < resident ? plan.tiles : resident;
  if (*grid < 1) *grid = 1;
  return cudaSuccess;
}

template <typename T>
void launch_partials(const Side& in, const Side& out, int64_t n, const Plan& plan, int64_t grid, float* partials,
                     cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(grid);
  sketch_partials_kernel<T><<<blocks, kThreads, plan.smem, stream>>>(in, out, n, plan.bt, plan.tiles, partials);
}

}  // namespace

// Contracts of both entry points: sketch_cuda.h.
int64_t sketch_cuda_partials(int64_t n, int64_t k_in, int64_t k_out, int dtype, int device) {
  Plan plan;
  if (make_plan(n, k_in, k_out, device, &plan) != cudaSuccess) return -1;
  if (plan.bt == 0) return 0;
  int64_t grid = 0;
  if (grid_size(plan, dtype, device, &grid) != cudaSuccess) return -1;
  return grid;
}

cudaError_t sketch_cuda(const void* x, const void* dy, int dtype, int64_t n, int64_t d_in, int64_t d_out,
                        int64_t x_stride_row, int64_t x_stride_col, int64_t dy_stride_row, int64_t dy_stride_col,
                        uint32_t key_in, uint32_t key_out, int64_t k_in, int64_t k_out, double scale, float* out,
                        bool accumulate, float* workspace, int64_t partials, int device, cudaStream_t stream) {
  Plan plan;
  cudaError_t err = make_plan(n, k_in, k_out, device, &plan);
  if (err != cudaSuccess) return err;
  if (plan.bt == 0 || partials < 1) return cudaErrorInvalidValue;
  int64_t grid = 0;
  err = grid_size(plan, dtype, device, &grid);
  if (err != cudaSuccess) return err;
  // The workspace was sized for `partials` blocks; never launch more.
  if (grid > partials) grid = partials;

  const Side in{x, x_stride_row, x_stride_col, d_in, static_cast<int>(k_in), plan.kp_in, key_in};
  const Side out_side{dy, dy_stride_row, dy_stride_col, d_out, static_cast<int>(k_out), plan.kp_out, key_out};
  switch (dtype) {
    case kFloat32:
      launch_partials<float>(in, out_side, n, plan, grid, workspace, stream);
      break;
    case kFloat16:
      launch_partials<__half>(in, out_side, n, plan, grid, workspace, stream);
      break;
    case kBFloat16:
      launch_partials<__nv_bfloat16>(in, out_side, n, plan, grid, workspace, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int count = static_cast<int>(k_out * k_in);
  const int reduce_threads = 256;
  sketch_reduce_kernel<<<(count + reduce_threads - 1) / reduce_threads, reduce_threads, 0, stream>>>(
      workspace, grid, count, scale, out, accumulate);
  return cudaGetLastError();
}

}  // namespace gard_kernels
