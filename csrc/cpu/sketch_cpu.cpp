// Fused gradient sketch on the CPU: out (+)= scale * (dy @ Sgn_out)^T (x @ Sgn_in).
//
// Sgn_* are the +-1 sign matrices of csrc/hash.h. They are never materialised: each worker
// regenerates one chunk of projection rows [chunk, kp] at a time into a cache-resident buffer and
// multiplies a block of tokens by it before moving on. Per token block and side:
//     xp[tb, kp_in] = x[tb, d_in] @ Sgn_in      dp[tb, kp_out] = dy[tb, d_out] @ Sgn_out
// then the slice's partial S[k_out, kp_in] += dp^T xp. Partials are summed in slice order, so the
// result is deterministic for a given thread count (which sets the token-block size). All sums
// are float32.
//
// bfloat16 inputs on CPUs with AVX-512 BF16 take a second projection path built on vdpbf16ps
// (fp32 += a0*b0 + a1*b1 over bf16 pairs): the signs are +-1, exact in bf16, so every product is
// exact and only the float32 sums round, as on the float path. It is chosen at run time
// (cpu_bf16_dot_supported) and can be switched off (set_cpu_bf16_dot) to test the fallback.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__)
#include <immintrin.h>
#endif
// The AVX-512 BF16 path: x86-64 with GCC or Clang, whose target attribute compiles it whatever
// -march says (the run-time check decides whether it runs).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GARD_BF16_DOT 1
#include <immintrin.h>
#define GARD_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define GARD_PREFETCH_L2(p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1)
#else
#define GARD_BF16_DOT 0
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../hash.h"

namespace gard_kernels {
namespace {

// Floats per vector the micro-kernel is written for (one AVX2 ymm, two NEON q-registers).
// splat() below spells out this many lanes.
constexpr int64_t kLanes = 8;
// Token rows per block are a multiple of 12, hence of both register-block heights (12 and 6).
constexpr int64_t kRowMultiple = 12;
constexpr int64_t kMaxTokenBlock = 480;
constexpr int64_t kMinTokenBlock = 48;
// Most partial sketches kept (4 MiB at k_in = k_out = 64): bounds memory for very long inputs.
constexpr int64_t kMaxSlices = 256;
// Floats per sign chunk (64 KiB: L2-resident). Measured against a 16 KiB, L1-sized chunk, this is
// about 10% faster at k = 16: each token row is then read in long contiguous runs that the
// hardware prefetcher streams, which matters more than L1 residency of the signs.
constexpr int64_t kSignChunkFloats = 16384;
// Features per chunk for token-major inputs, whose [tb, chunk] block is packed whole.
constexpr int64_t kTokenMajorChunk = 32;

#if defined(__GNUC__) || defined(__clang__)
// GCC/Clang vector extension: portable SIMD that lowers to AVX2/AVX-512/NEON as -march allows.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
#define GARD_UNROLL _Pragma("GCC unroll 16")
#define GARD_PREFETCH(p) __builtin_prefetch(p)
inline Vec splat(float a) { return Vec{a, a, a, a, a, a, a, a}; }
#else
struct Vec {
  float v[kLanes];
  Vec& operator+=(const Vec& o) {
    for (int64_t l = 0; l < kLanes; ++l) v[l] += o.v[l];
    return *this;
  }
  Vec operator*(const Vec& o) const {
    Vec r;
    for (int64_t l = 0; l < kLanes; ++l) r.v[l] = v[l] * o.v[l];
    return r;
  }
};
#define GARD_UNROLL
#define GARD_PREFETCH(p) ((void)(p))
inline Vec splat(float a) {
  Vec v;
  for (int64_t l = 0; l < kLanes; ++l) v.v[l] = a;
  return v;
}
#endif

// memcpy loads/stores: no alignment requirement and no aliasing questions (signs are uint32 bits).
inline Vec load_vec(const void* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void store_vec(float* p, const Vec& v) { std::memcpy(p, &v, sizeof(Vec)); }

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return div_up(a, b) * b; }

// c[R, V*8] += a[R, len] @ b[len, V*8].
// a: float rows lda apart; b: bits of +-1.0f (or 0), rows ldb apart; c: rows ldc apart.
// The R*V accumulators stay in registers; each loaded sign row serves R token rows.
template <int R, int V>
void micro_kernel(const float* a, int64_t lda, int64_t len, const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
  Vec acc[R][V];
  GARD_UNROLL
  for (int r = 0; r < R; ++r) {
    GARD_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v] = load_vec(c + r * ldc + v * kLanes);
  }
  for (int64_t j = 0; j < len; ++j) {
    Vec b_row[V];
    GARD_UNROLL
    for (int v = 0; v < V; ++v) b_row[v] = load_vec(b + j * ldb + v * kLanes);
    GARD_UNROLL
    for (int r = 0; r < R; ++r) {
      const Vec a_rj = splat(a[r * lda + j]);
      GARD_UNROLL
      for (int v = 0; v < V; ++v) acc[r][v] += a_rj * b_row[v];
    }
  }
  GARD_UNROLL
  for (int r = 0; r < R; ++r) {
    GARD_UNROLL
    for (int v = 0; v < V; ++v) store_vec(c + r * ldc + v * kLanes, acc[r][v]);
  }
}

// Register blocking: R token rows x V vectors of columns. R*V accumulators + V sign vectors + one
// broadcast must fit the 16 AVX2 registers, else the compiler folds the sign loads into the FMAs
// and the kernel turns load-bound. R=6, V=2 (15 registers) measured fastest; R=12, V=1 serves k <= 8.
template <int R>
constexpr int max_vectors() {
  return 12 / R;
}

inline int rows_per_group(int64_t kp) { return kp <= kLanes ? 12 : 6; }

// c[R, kp] += a[R, len] @ b[len, kp], in column panels of max_vectors<R>() vectors.
template <int R>
void panel_kernel(const float* a, int64_t lda, int64_t len, const uint32_t* b, int64_t kp, float* c) {
  constexpr int kV = max_vectors<R>();
  static_assert(kV == 1 || kV == 2, "panels are one or two vectors wide");
  int64_t col = 0;
  for (; col + kV * kLanes <= kp; col += kV * kLanes) micro_kernel<R, kV>(a, lda, len, b + col, kp, c + col, kp);
  // kp is a multiple of kLanes, so at most one vector is left.
  if (col < kp) micro_kernel<R, 1>(a, lda, len, b + col, kp, c + col, kp);
}

// Sign chunk for projection rows [row0, row0 + len): bits of +-1.0f, [len, kp], zero past column k.
void make_signs(uint32_t key, int64_t row0, int64_t len, int64_t k, int64_t kp, uint32_t* sgn) {
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t row_h = row_hash(key, static_cast<uint32_t>(row0 + j));
    uint32_t* dst = sgn + j * kp;
    // 32-bit column counter: the hash is 32-bit, and a 64-bit one costs lane shuffles per vector.
    for (uint32_t col = 0; col < static_cast<uint32_t>(k); ++col) dst[col] = sign_float_bits(cell_hash(row_h, col));
    for (int64_t col = k; col < kp; ++col) dst[col] = 0u;
  }
}

// One side of the op (x with Sgn_in, or dy with Sgn_out) as the kernel sees it.
struct Side {
  const void* data;  // [n, d] elements of the input dtype
  int64_t stride_row, stride_col;  // in elements
  int64_t d, k, kp;  // features, sketch width, width padded to kLanes
  uint32_t key;
  int64_t chunk;  // projection rows per sign chunk
  // bf16 path: the register block's rows fall into few L1 sets (row strides near a multiple of
  // 4 KiB), so they are copied to a buffer with a padded stride first.
  bool rows_alias;
  // Tokens closer in memory than features (e.g. a transposed view): packed a block at a time.
  bool token_major;
};

// dst[0:len] = float(src[0:len]) for a contiguous row.
template <typename T>
inline void convert_row(const T* src, int64_t len, float* dst) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(src[j]);
}

#if defined(__F16C__)
// c10::Half converts one element at a time (a scalar vcvtph2ps); F16C converts eight.
template <>
inline void convert_row<c10::Half>(const c10::Half* src, int64_t len, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
  for (; j < len; ++j) dst[j] = static_cast<float>(src[j]);
}
#endif

// Copy of a[rows, len] into dst [R, len] with rows ldd apart (rows <= R; zero rows after them), as
// float (D = float) or unchanged (D = T, for the bf16 dot-product path).
template <typename T, int R, typename D = float>
void pack_rows(const T* a, int64_t stride_row, int64_t stride_col, int64_t rows, int64_t len, D* dst, int64_t ldd) {
  for (int r = 0; r < R; ++r) {
    D* d_row = dst + r * ldd;
    if (r >= rows) {
      std::fill(d_row, d_row + len, D(0.0f));
      continue;
    }
    const T* a_row = a + r * stride_row;
    if (stride_col != 1) {
      for (int64_t j = 0; j < len; ++j) d_row[j] = static_cast<D>(a_row[j * stride_col]);
    } else if constexpr (std::is_same<D, float>::value) {
      convert_row(a_row, len, d_row);
    } else {
      static_assert(std::is_same<D, T>::value, "packing copies or converts to float");
      std::memcpy(d_row, a_row, len * sizeof(D));
    }
  }
}

// Float copy of a[rows, len] into dst [rows rounded up to R, len], zero rows after them. For
// token-major inputs: reads run along tokens, so each feature costs one pass over contiguous
// memory instead of one cache line (and page) per element.
template <typename T, int R, typename D = float>
void pack_block_token_major(const T* a, int64_t stride_row, int64_t stride_col, int64_t rows, int64_t len,
                            D* dst) {
  // 64-token strips: a strip's source lines and destination rows stay in L1 while j sweeps the
  // chunk. The next strip is prefetched: its `len` source streams (one per feature, often a page
  // apart) are more than the hardware prefetcher follows. Measured ~1.5x faster than 16-token
  // strips without prefetch on a [2048, 4096]^T float32 input.
  constexpr int64_t kStrip = 64;
  for (int64_t t0 = 0; t0 < rows; t0 += kStrip) {
    const int64_t t1 = std::min(rows, t0 + kStrip);
    for (int64_t j = 0; j < len; ++j) {
      const T* a_col = a + j * stride_col;
      for (int64_t t = t1; t < std::min(rows, t1 + kStrip); t += 16) GARD_PREFETCH(a_col + t * stride_row);
      for (int64_t t = t0; t < t1; ++t) dst[t * len + j] = static_cast<D>(a_col[t * stride_row]);
    }
  }
  std::fill(dst + rows * len, dst + round_up(rows, R) * len, D(0.0f));
}

// proj[rows rounded up to R, kp] = s.data[t0 : t0 + rows] @ Sgn.
template <typename T, int R>
void project_block(const Side& s, int64_t t0, int64_t rows, float* proj, uint32_t* sgn, float* pack) {
  const T* base = static_cast<const T*>(s.data);
  // float32 rows with unit feature stride feed the micro-kernel in place; the rest is packed.
  const bool direct = std::is_same<T, float>::value && s.stride_col == 1;
  std::fill(proj, proj + round_up(rows, R) * s.kp, 0.0f);
  for (int64_t c0 = 0; c0 < s.d; c0 += s.chunk) {
    const int64_t len = std::min(s.chunk, s.d - c0);
    make_signs(s.key, c0, len, s.k, s.kp, sgn);
    if (s.token_major) {
      pack_block_token_major<T, R>(base + t0 * s.stride_row + c0 * s.stride_col, s.stride_row, s.stride_col, rows,
                                   len, pack);
      for (int64_t r0 = 0; r0 < rows; r0 += R) panel_kernel<R>(pack + r0 * len, len, len, sgn, s.kp, proj + r0 * s.kp);
      continue;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
      const T* a = base + (t0 + r0) * s.stride_row + c0 * s.stride_col;
      if (direct && r0 + R <= rows) {
        panel_kernel<R>(reinterpret_cast<const float*>(a), s.stride_row, len, sgn, s.kp, proj + r0 * s.kp);
      } else {
        pack_rows<T, R>(a, s.stride_row, s.stride_col, std::min<int64_t>(R, rows - r0), len, pack, len);
        panel_kernel<R>(pack, len, len, sgn, s.kp, proj + r0 * s.kp);
      }
    }
  }
}

template <typename T>
void project_block_dispatch(const Side& s, int64_t t0, int64_t rows, float* proj, uint32_t* sgn, float* pack) {
  if (rows_per_group(s.kp) == 12) return project_block<T, 12>(s, t0, rows, proj, sgn, pack);
  return project_block<T, 6>(s, t0, rows, proj, sgn, pack);
}

// Whether the bf16 path may run: set_cpu_bf16_dot(false) forces the float path (tests, A/B runs).
std::atomic<bool> g_bf16_dot_enabled{true};

#if GARD_BF16_DOT
// Floats per lane group of the bf16 path: one zmm of float32 accumulators.
constexpr int64_t kLanesBf16 = 16;
// Token rows per register block: 12 rows x 2 vectors = 24 accumulators + 2 sign vectors of the
// 32 zmm registers, and 12 divides every token block (kRowMultiple).
constexpr int kRowsBf16 = 12;
// Sign chunk of the bf16 path: 64 KiB of bf16 signs, as kSignChunkFloats is 64 KiB of floats.
constexpr int64_t kSignChunkBf16 = 32768;
// How far (in feature pairs) the upper half of a register block's rows runs ahead of the lower
// half in micro_kernel_bf16_skewed: 128 bytes, two L1 sets. (Copying aliased rows to a padded
// buffer does not help: the copy's own loads alias the same way.)
constexpr int64_t kSkewPairs = 32;

// bf16 bits of +1 or -1 for a hash value (bit 31 of the hash is the sign).
inline uint32_t sign_bf16_bits(uint32_t h) { return 0x3F80u | ((h >> 16) & 0x8000u); }

// Sign chunk for projection rows [row0, row0 + len) in the pair layout vdpbf16ps reads:
// sgn[p, col] (uint32, kp per pair row) holds the bf16 signs of rows 2p (low half) and 2p + 1
// (high half). Columns >= k and the missing row of an odd tail are zero.
void make_signs_bf16(uint32_t key, int64_t row0, int64_t len, int64_t k, int64_t kp, uint32_t* sgn) {
  for (int64_t p = 0; p < (len + 1) / 2; ++p) {
    const uint32_t h_lo = row_hash(key, static_cast<uint32_t>(row0 + 2 * p));
    const bool has_hi = 2 * p + 1 < len;
    const uint32_t h_hi = row_hash(key, static_cast<uint32_t>(row0 + 2 * p + 1));
    const uint32_t hi_mask = has_hi ? 0xFFFFu : 0u;
    uint32_t* dst = sgn + p * kp;
    for (uint32_t col = 0; col < static_cast<uint32_t>(k); ++col) {
      dst[col] = sign_bf16_bits(cell_hash(h_lo, col)) | ((sign_bf16_bits(cell_hash(h_hi, col)) & hi_mask) << 16);
    }
    for (int64_t col = k; col < kp; ++col) dst[col] = 0u;
  }
}

// Whether kRowsBf16 rows stride_bytes apart crowd one L1 set (64 sets of 64-byte lines, 4 KiB
// per way): more than 4 of them in a set leaves too few of its 8 ways for the sign rows. Rows
// 4 KiB apart all land in one set and evict each other every step: measured 2.8x slower at
// d = 2048 than the same rows with a padded stride.
inline bool rows_alias_in_l1(int64_t stride_bytes) {
  int count[64] = {0};
  for (int64_t r = 0; r < kRowsBf16; ++r) {
    if (++count[((r * stride_bytes) / 64) % 64] > 4) return true;
  }
  return false;
}

// Row stride (elements) of a packed [kRowsBf16, len] bf16 block: whole 64-byte lines, padded
// until the rows spread over the L1 sets (at most 95 elements past len; Scratch leaves room).
inline int64_t pack_stride_bf16(int64_t len) {
  int64_t ld = round_up(len, 32) + 32;
  if (rows_alias_in_l1(ld * 2)) ld += 32;
  return ld;
}

inline uint32_t load_u32(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The start of both bf16 micro-kernels: the accumulators take c's current values.
template <int R, int V>
GARD_BF16_TARGET inline __attribute__((always_inline)) void start_bf16(__m512 (&acc)[R][V], const float* c,
                                                                       int64_t ldc) {
  GARD_UNROLL
  for (int r = 0; r < R; ++r) {
    GARD_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_loadu_ps(c + r * ldc + v * kLanesBf16);
  }
}

// The end of both bf16 micro-kernels: an odd last feature pairs with a zero (not with whatever
// follows it in memory, which may be NaN; its sign row's high halves are zero), then the
// accumulators go back to c.
template <int R, int V>
GARD_BF16_TARGET inline __attribute__((always_inline)) void finish_bf16(__m512 (&acc)[R][V], const uint16_t* a,
                                                                        int64_t lda, int64_t len, const uint32_t* b,
                                                                        int64_t ldb, float* c, int64_t ldc) {
  if (len & 1) {
    const int64_t pairs = len / 2;
    __m512bh b_row[V];
    GARD_UNROLL
    for (int v = 0; v < V; ++v) b_row[v] = (__m512bh)_mm512_loadu_si512(b + pairs * ldb + v * kLanesBf16);
    GARD_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512bh a_rp = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + len - 1]));
      GARD_UNROLL
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a_rp, b_row[v]);
    }
  }
  GARD_UNROLL
  for (int r = 0; r < R; ++r) {
    GARD_UNROLL
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + v * kLanesBf16, acc[r][v]);
  }
}

// c[R, V*16] += a[R, len] @ b[len, V*16] with vdpbf16ps.
// a: bf16 rows lda apart (pairs of consecutive features are one 32-bit broadcast); b: the pair
// layout of make_signs_bf16, ldb uint32 per pair row; c: float rows ldc apart.
template <int R, int V>
GARD_BF16_TARGET void micro_kernel_bf16(const uint16_t* a, int64_t lda, int64_t len, const uint32_t* b, int64_t ldb,
                                        float* c, int64_t ldc) {
  __m512 acc[R][V];
  start_bf16<R, V>(acc, c, ldc);
  const int64_t pairs = len / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    // One row of the next register block per step, 256 bytes ahead: by the time that block
    // runs, its first lines are in L2 (hardware prefetchers follow fewer streams than 2 x 12).
    if ((p & 15) < R) GARD_PREFETCH_L2(a + (R + (p & 15)) * lda + 2 * p + 128);
    __m512bh b_row[V];
    GARD_UNROLL
    for (int v = 0; v < V; ++v) b_row[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + v * kLanesBf16);
    GARD_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512bh a_rp = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_u32(a + r * lda + 2 * p)));
      GARD_UNROLL
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a_rp, b_row[v]);
    }
  }
  finish_bf16<R, V>(acc, a, lda, len, b, ldb, c, ldc);
}

// micro_kernel_bf16 for rows that alias in L1 (rows_alias_in_l1): the upper half of the rows
// starts its walk over the feature pairs kSkewPairs later (wrapping around at the end), so at
// every step the two halves' loads fall in two different L1 sets, and each row is still read
// front to back (one stream per page for the hardware prefetcher). Each half has its own sign
// row per step. Measured at N = 4096, d = 2048 (rows 4 KiB apart), 1 thread: ~230 GFLOP/s,
// against ~200 walking two halves of the pairs with 6 rows, ~75 for the plain 12-row kernel.
// One step of micro_kernel_bf16_skewed: the lower R/2 rows at pair p, the upper ones at pair q.
// A function rather than a lambda: a lambda does not inherit GARD_BF16_TARGET, and the
// intrinsics would then only compile where -march already enables AVX-512 BF16.
template <int R, int V>
GARD_BF16_TARGET inline __attribute__((always_inline)) void skewed_step(__m512 (&acc)[R][V], const uint16_t* a,
                                                                        int64_t lda, const uint32_t* b, int64_t ldb,
                                                                        int64_t p, int64_t q) {
  constexpr int kLower = R / 2;
  if ((p & 15) < R) {
    const int64_t r = p & 15;
    GARD_PREFETCH_L2(a + (R + r) * lda + 2 * (r < kLower ? p : q) + 128);
  }
  __m512bh b_p[V], b_q[V];
  GARD_UNROLL
  for (int v = 0; v < V; ++v) {
    b_p[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + v * kLanesBf16);
    b_q[v] = (__m512bh)_mm512_loadu_si512(b + q * ldb + v * kLanesBf16);
  }
  GARD_UNROLL
  for (int r = 0; r < R; ++r) {
    const int64_t pair = r < kLower ? p : q;
    const __m512bh a_r = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_u32(a + r * lda + 2 * pair)));
    GARD_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a_r, r < kLower ? b_p[v] : b_q[v]);
  }
}

template <int R, int V>
GARD_BF16_TARGET void micro_kernel_bf16_skewed(const uint16_t* a, int64_t lda, int64_t len, const uint32_t* b,
                                               int64_t ldb, float* c, int64_t ldc) {
  __m512 acc[R][V];
  start_bf16<R, V>(acc, c, ldc);
  const int64_t pairs = len / 2;
  const int64_t skew = std::min<int64_t>(kSkewPairs, pairs / 2);
  for (int64_t p = 0; p < pairs - skew; ++p) skewed_step<R, V>(acc, a, lda, b, ldb, p, p + skew);
  for (int64_t p = pairs - skew; p < pairs; ++p) skewed_step<R, V>(acc, a, lda, b, ldb, p, p + skew - pairs);
  finish_bf16<R, V>(acc, a, lda, len, b, ldb, c, ldc);
}

// c[R, kp] += a[R, len] @ b[len, kp], in column panels of two vectors.
template <int R>
GARD_BF16_TARGET void panel_kernel_bf16(const uint16_t* a, int64_t lda, int64_t len, const uint32_t* b, int64_t kp,
                                        float* c, bool skewed) {
  int64_t col = 0;
  if (skewed) {
    for (; col + 2 * kLanesBf16 <= kp; col += 2 * kLanesBf16) {
      micro_kernel_bf16_skewed<R, 2>(a, lda, len, b + col, kp, c + col, kp);
    }
    if (col < kp) micro_kernel_bf16_skewed<R, 1>(a, lda, len, b + col, kp, c + col, kp);
    return;
  }
  for (; col + 2 * kLanesBf16 <= kp; col += 2 * kLanesBf16) {
    micro_kernel_bf16<R, 2>(a, lda, len, b + col, kp, c + col, kp);
  }
  // kp is a multiple of 16, so at most one vector is left.
  if (col < kp) micro_kernel_bf16<R, 1>(a, lda, len, b + col, kp, c + col, kp);
}

// proj[rows rounded up to R, kp] = s.data[t0 : t0 + rows] @ Sgn for bf16 data.
template <int R>
void project_block_bf16(const Side& s, int64_t t0, int64_t rows, float* proj, uint32_t* sgn, c10::BFloat16* pack) {
  const c10::BFloat16* base = static_cast<const c10::BFloat16*>(s.data);
  const uint16_t* pack_bits = reinterpret_cast<const uint16_t*>(pack);
  std::fill(proj, proj + round_up(rows, R) * s.kp, 0.0f);
  for (int64_t c0 = 0; c0 < s.d; c0 += s.chunk) {
    const int64_t len = std::min(s.chunk, s.d - c0);
    make_signs_bf16(s.key, c0, len, s.k, s.kp, sgn);
    if (s.token_major) {
      pack_block_token_major<c10::BFloat16, R, c10::BFloat16>(
          base + t0 * s.stride_row + c0 * s.stride_col, s.stride_row, s.stride_col, rows, len, pack);
      for (int64_t r0 = 0; r0 < rows; r0 += R) {
        panel_kernel_bf16<R>(pack_bits + r0 * len, len, len, sgn, s.kp, proj + r0 * s.kp, false);
      }
      continue;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
      const c10::BFloat16* a = base + (t0 + r0) * s.stride_row + c0 * s.stride_col;
      if (s.stride_col == 1 && r0 + R <= rows) {
        panel_kernel_bf16<R>(reinterpret_cast<const uint16_t*>(a), s.stride_row, len, sgn, s.kp, proj + r0 * s.kp,
                             s.rows_alias);
      } else {
        const int64_t ld = pack_stride_bf16(len);
        pack_rows<c10::BFloat16, R, c10::BFloat16>(a, s.stride_row, s.stride_col,
                                                           std::min<int64_t>(R, rows - r0), len, pack, ld);
        panel_kernel_bf16<R>(pack_bits, ld, len, sgn, s.kp, proj + r0 * s.kp, false);
      }
    }
  }
}

bool cpu_has_bf16_dot() {
  // Checks CPUID and that the OS saves the zmm state; evaluated once.
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

void project_block_bf16_dispatch(const Side& s, int64_t t0, int64_t rows, float* proj, uint32_t* sgn,
                                 c10::BFloat16* pack) {
  project_block_bf16<kRowsBf16>(s, t0, rows, proj, sgn, pack);
}
#else
bool cpu_has_bf16_dot() { return false; }
void project_block_bf16_dispatch(const Side&, int64_t, int64_t, float*, uint32_t*, c10::BFloat16*) {
  TORCH_CHECK(false, "gard_kernels: the AVX-512 BF16 path is not compiled for this platform");
}
#endif

// s_acc[k_out, kp_in] += dp[rows, :k_out]^T xp[rows, kp_in].
void outer_product(const float* dp, int64_t kp_out, int64_t k_out, const float* xp, int64_t kp_in, int64_t rows,
                   float* s_acc) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* xp_t = xp + t * kp_in;
    for (int64_t o = 0; o < k_out; ++o) {
      const float w = dp[t * kp_out + o];
      float* s_row = s_acc + o * kp_in;
      for (int64_t i = 0; i < kp_in; ++i) s_row[i] += w * xp_t[i];
    }
  }
}

// bf16_dot: lay the side out for project_block_bf16 (16-column padding, even sign chunks).
Side make_side(const at::Tensor& t, uint32_t key, int64_t k, bool bf16_dot) {
  Side s;
  s.data = t.data_ptr();
  s.stride_row = t.stride(0);
  s.stride_col = t.stride(1);
  s.d = t.size(1);
  s.k = k;
  s.kp = round_up(k, kLanes);
  s.key = key;
  s.token_major = s.stride_row < s.stride_col;
  s.rows_alias = false;
  s.chunk = std::min(s.d, s.token_major ? kTokenMajorChunk : std::max<int64_t>(16, kSignChunkFloats / s.kp));
#if GARD_BF16_DOT
  if (bf16_dot) {
    s.kp = round_up(k, kLanesBf16);
    // Even, so chunks start on a feature pair; the sign buffer then holds chunk/2 * kp uint32,
    // less than the float path's chunk * kp floats it is sized for.
    const int64_t chunk = s.token_major ? kTokenMajorChunk : std::max<int64_t>(32, kSignChunkBf16 / s.kp / 2 * 2);
    s.chunk = std::min(s.d, chunk);
    s.rows_alias = rows_alias_in_l1(std::abs(s.stride_row) * static_cast<int64_t>(sizeof(c10::BFloat16)));
  }
#else
  (void)bf16_dot;
#endif
  return s;
}

// Per-worker scratch, in floats, each region rounded to a 64-byte line.
struct Scratch {
  int64_t xp, dp, sgn, pack, total;
  Scratch(int64_t tb, const Side& in, const Side& out) {
    const auto line = [](int64_t f) { return round_up(f, 16); };
    // + kRowMultiple * 64 floats: the bf16 path pads each packed row by up to 95 bf16 elements
    // (pack_stride_bf16), which this covers even when the chunk is a few features wide.
    const auto pack_floats = [tb](const Side& s) {
      return s.token_major ? (tb + kRowMultiple) * s.chunk : kRowMultiple * (s.chunk + 64);
    };
    xp = line((tb + kRowMultiple) * in.kp);
    dp = line((tb + kRowMultiple) * out.kp);
    sgn = line(std::max(in.chunk * in.kp, out.chunk * out.kp));
    pack = line(std::max(pack_floats(in), pack_floats(out)));
    total = xp + dp + sgn + pack;
  }
};

// Token-block size: a multiple of 12 in [48, 480] that gives every worker the same block count.
int64_t token_block(int64_t n, int64_t threads) {
  const int64_t per_worker = div_up(div_up(n, kMaxTokenBlock), threads);
  return std::max(kMinTokenBlock, round_up(div_up(n, per_worker * threads), kRowMultiple));
}

template <typename T>
void sketch_cpu_impl(const at::Tensor& x, const at::Tensor& dy, uint32_t key_in, uint32_t key_out, int64_t k_in,
                     int64_t k_out, double scale, const at::Tensor& out, bool accumulate) {
  const int64_t n = x.size(0);
  const bool bf16_dot = std::is_same<T, c10::BFloat16>::value && g_bf16_dot_enabled.load() && cpu_has_bf16_dot();
  const Side in = make_side(x, key_in, k_in, bf16_dot);
  const Side sd_out = make_side(dy, key_out, k_out, bf16_dot);
  // torch's thread count (torch.set_num_threads), shared with its own OpenMP pool.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tb = token_block(n, threads);
  const int64_t blocks = div_up(n, tb);
  // Slices of consecutive blocks are the unit of work and own the partial sums; handing them out
  // dynamically keeps cores busy when one of them is slowed (shared machine), and summing the
  // partials in slice order keeps the result independent of which thread ran which slice.
  const int64_t slices = std::min(blocks, kMaxSlices);
  const int64_t workers = std::min(threads, slices);
  const Scratch layout(tb, in, sd_out);
  const int64_t s_floats = k_out * in.kp;
  at::Tensor partials = at::zeros({slices, s_floats}, x.options().dtype(at::kFloat));
  at::Tensor scratch = at::empty({workers, layout.total}, x.options().dtype(at::kFloat));
  float* p_partials = partials.data_ptr<float>();
  float* p_scratch = scratch.data_ptr<float>();

  const auto run_slice = [&](int64_t slice, int64_t worker) {
    float* xp = p_scratch + worker * layout.total;
    float* dp = xp + layout.xp;
    uint32_t* sgn = reinterpret_cast<uint32_t*>(dp + layout.dp);
    float* pack = reinterpret_cast<float*>(sgn) + layout.sgn;
    float* s_acc = p_partials + slice * s_floats;
    for (int64_t b = blocks * slice / slices; b < blocks * (slice + 1) / slices; ++b) {
      const int64_t t0 = b * tb;
      const int64_t rows = std::min(tb, n - t0);
      if (bf16_dot) {
        project_block_bf16_dispatch(in, t0, rows, xp, sgn, reinterpret_cast<c10::BFloat16*>(pack));
        project_block_bf16_dispatch(sd_out, t0, rows, dp, sgn, reinterpret_cast<c10::BFloat16*>(pack));
      } else {
        project_block_dispatch<T>(in, t0, rows, xp, sgn, pack);
        project_block_dispatch<T>(sd_out, t0, rows, dp, sgn, pack);
      }
      outer_product(dp, sd_out.kp, k_out, xp, in.kp, rows, s_acc);
    }
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(workers))
  {
    const int64_t worker = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (int64_t slice = 0; slice < slices; ++slice) run_slice(slice, worker);
  }
#else
  for (int64_t slice = 0; slice < slices; ++slice) run_slice(slice, 0);
#endif

  float* p_out = out.data_ptr<float>();
  for (int64_t o = 0; o < k_out; ++o) {
    for (int64_t i = 0; i < k_in; ++i) {
      float sum = 0.0f;
      for (int64_t slice = 0; slice < slices; ++slice) sum += p_partials[slice * s_floats + o * in.kp + i];
      const float value = static_cast<float>(scale * static_cast<double>(sum));
      // Overwriting never reads out, which may hold NaN.
      p_out[o * k_in + i] = accumulate ? p_out[o * k_in + i] + value : value;
    }
  }
}

}  // namespace

// out (+)= scale * (dy @ Sgn_out)^T (x @ Sgn_in). Inputs checked by the caller (bindings.cpp):
// x [n, d_in], dy [n, d_out] on the CPU, one dtype of float32/float16/bfloat16, any strides, n > 0;
// out [k_out, k_in] float32 contiguous.
void sketch_cpu(const at::Tensor& x, const at::Tensor& dy, uint32_t key_in, uint32_t key_out, int64_t k_in,
                int64_t k_out, double scale, const at::Tensor& out, bool accumulate) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return sketch_cpu_impl<float>(x, dy, key_in, key_out, k_in, k_out, scale, out, accumulate);
    case at::kHalf:
      return sketch_cpu_impl<c10::Half>(x, dy, key_in, key_out, k_in, k_out, scale, out, accumulate);
    case at::kBFloat16:
      return sketch_cpu_impl<c10::BFloat16>(x, dy, key_in, key_out, k_in, k_out, scale, out, accumulate);
    default:
      TORCH_CHECK(false, std::string("gard_kernels::sketch: unsupported dtype ") + c10::toString(x.scalar_type()));
  }
}

// Whether this CPU (and build) can run the AVX-512 BF16 path for bfloat16 inputs.
bool cpu_bf16_dot_supported() { return cpu_has_bf16_dot(); }

// Allows (true, the default) or forbids the AVX-512 BF16 path; returns the previous setting.
bool set_cpu_bf16_dot(bool enabled) { return g_bf16_dot_enabled.exchange(enabled); }

// P [d, k] float32 with +-1/sqrt(k) from the hash (tests compare it with hashing.py bit for bit).
at::Tensor projection_cpu(uint32_t key, int64_t d, int64_t k) {
  at::Tensor p = at::empty({d, k}, at::TensorOptions().dtype(at::kFloat));
  // Rounded once from double, as hashing.py does, so the two agree exactly.
  const float magnitude = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));
  float* p_p = p.data_ptr<float>();
  at::parallel_for(0, d, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint32_t row_h = row_hash(key, static_cast<uint32_t>(row));
      for (int64_t col = 0; col < k; ++col) {
        const bool negative = cell_hash(row_h, static_cast<uint32_t>(col)) >> 31;
        p_p[row * k + col] = negative ? -magnitude : magnitude;
      }
    }
  });
  return p;
}

}  // namespace gard_kernels
