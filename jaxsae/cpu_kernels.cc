// XLA:CPU kernels behind jaxsae.cpu_kernels, as XLA FFI handlers: the top-k of each row, and the sparse
// pieces of the TopK and HierarchicalTopK backward passes, a mix over sources (LIMe v2) with its backward, and
// a matmul and causal attention for lime_jax's inference forward.
// All split their work over XLA's intra-op threads.
//
// Top-k of each row of a float32 [..., M] array.
//
// Results equal jax.lax.top_k's: values in descending order under the total order XLA uses
// (-NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN), ties to the lower index. XLA:CPU's own TopK
// partial-sorts an index vector per row on one thread; this one finds a floor for the k-th best in one
// vectorised pass, collects what reaches it in a second, selects among those few, and splits the rows over
// XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Float bits -> int32 whose signed order is XLA's total order on floats.
inline int32_t Key(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b ^ ((b >> 31) & 0x7fffffff);  // branch-free, so the block scan below vectorises
}

struct Entry {
  int32_t key;
  int32_t idx;
};

// a ranks above b: a larger key, or the same key at a lower index.
inline bool Better(const Entry& a, const Entry& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

// Keeps the best k of buf[0, n) in buf[0, k) and returns the key of the k-th best.
inline int32_t Compact(Entry* buf, int64_t n, int64_t k) {
  std::nth_element(buf, buf + k - 1, buf + n, Better);
  return buf[k - 1].key;
}

// buf holds cap + 16 entries, cap >= 2k. A first pass sets the floor `lo`: the least of the maxima of k
// disjoint chunks, which k elements reach, so nothing below it is in the top k. The second pass appends every
// element at or above the floor without a branch (the write happens anyway, the count moves only on a hit);
// a full buffer is cut back to its best k and the floor raised past the k-th best: an element equal to the
// k-th best found later has a higher index than every kept one, so k kept elements rank above it.
// With kBias the row is x + bias (one float add per element, as XLA's), without storing the sum.
template <bool kBias>
void TopKRow(const float* x, const float* bias, int64_t m, int64_t k, int64_t cap, Entry* buf, float* vals,
             int32_t* idx) {
  auto at = [x, bias](int64_t i) {
    if constexpr (kBias) return x[i] + bias[i];
    else return x[i];
  };
  int64_t chunk = m / k;
  int32_t lo = INT32_MAX;
  for (int64_t j = 0; j < k; ++j) {
    int64_t end = j == k - 1 ? m : (j + 1) * chunk;
    int32_t top = INT32_MIN;
    for (int64_t i = j * chunk; i < end; ++i) top = std::max(top, Key(at(i)));
    lo = std::min(lo, top);
  }
  int64_t n = 0;
  for (int64_t i = 0; i < m; i += 16) {
    int64_t len = std::min<int64_t>(16, m - i);
    if (len == 16) {
      // One vectorised test skips the blocks with nothing at or above the floor: most of them.
      int32_t hit = 0;
      for (int j = 0; j < 16; ++j) hit |= Key(at(i + j)) >= lo;
      if (!hit) continue;
    }
    for (int64_t j = 0; j < len; ++j) {
      int32_t key = Key(at(i + j));
      buf[n] = {key, static_cast<int32_t>(i + j)};
      n += key >= lo;
    }
    if (n >= cap) {
      int32_t kth = Compact(buf, n, k);
      n = k;
      if (kth == INT32_MAX) break;  // nothing can rank above the kept k any more
      lo = kth + 1;
    }
  }
  if (n > k) Compact(buf, n, k);
  std::sort(buf, buf + k, Better);
  for (int64_t j = 0; j < k; ++j) {
    vals[j] = at(buf[j].idx);
    idx[j] = buf[j].idx;
  }
}

// ParallelFor runs fn(0, slot) .. fn(n - 1, slot) on the calling thread and up to `workers - 1` pool threads
// (slot: which of them, for per-worker buffers). Tasks are handed out from a shared counter and the caller works
// too, so the call finishes even when no pool thread is free. The state is shared-owned: a pool task that starts
// after the call returned still reads `next` (and then finds nothing left to do).
struct ParallelState {
  std::function<void(int64_t, int64_t)> fn;  // (task, worker slot)
  int64_t n;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> slots{0};

  void Work() {
    int64_t slot = slots.fetch_add(1);
    for (int64_t t; (t = next.fetch_add(1)) < n;) {
      fn(t, slot);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t workers, std::function<void(int64_t, int64_t)> fn) {
  auto state = std::make_shared<ParallelState>();
  state->fn = std::move(fn);
  state->n = n;
  for (int64_t t = 0; t + 1 < std::min(workers, n); ++t) pool.Schedule([state] { state->Work(); });
  state->Work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

int64_t Workers(ffi::ThreadPool& pool, int64_t work) {
  return work < (1 << 16) ? 1 : std::max<int64_t>(1, pool.num_threads());  // tiny calls stay on one thread
}

// bias: [0] (none), or [..., M] with leading dims a prefix of x's: each bias row serves an equal run of x rows.
ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                    ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto dims = x.dimensions();
  auto out_dims = vals->dimensions();
  if (dims.size() == 0 || out_dims.size() != dims.size()) return ffi::Error::InvalidArgument("top_k: rank");
  int64_t m = dims.back(), k = out_dims.back();
  if (k < 1 || k > m) return ffi::Error::InvalidArgument("top_k: k must be in [1, M]");
  int64_t rows = static_cast<int64_t>(x.element_count()) / m;
  if (rows == 0) return ffi::Error::Success();
  int64_t bias_rows = static_cast<int64_t>(bias.element_count()) / m;
  if (bias_rows * m != static_cast<int64_t>(bias.element_count()) || (bias_rows && rows % bias_rows))
    return ffi::Error::InvalidArgument("top_k: bias must be [0] or [..., M] with a row count dividing x's");
  int64_t per_bias = bias_rows ? rows / bias_rows : rows;
  const float *px = x.typed_data(), *pb = bias.typed_data();
  float* pv = vals->typed_data();
  int32_t* pi = idx->typed_data();
  int64_t workers = Workers(pool, rows * m);
  int64_t block = std::max<int64_t>(1, rows / (4 * workers));  // about four blocks per worker balance the rows
  int64_t cap = std::max<int64_t>(4 * k, 64);
  std::vector<std::vector<Entry>> bufs(workers, std::vector<Entry>(cap + 16));
  ParallelFor(pool, (rows + block - 1) / block, workers, [&](int64_t b, int64_t slot) {
    Entry* buf = bufs[slot].data();
    for (int64_t r = b * block; r < std::min(rows, (b + 1) * block); ++r) {
      if (bias_rows)
        TopKRow<true>(px + r * m, pb + (r / per_bias) * m, m, k, cap, buf, pv + r * k, pi + r * k);
      else
        TopKRow<false>(px + r * m, nullptr, m, k, cap, buf, pv + r * k, pi + r * k);
    }
  });
  return ffi::Error::Success();
}

// Dot product of two float rows with 16 running sums: it vectorises without fast-math.
inline float Dot(const float* a, const float* b, int64_t n) {
  float part[16] = {0.0f};
  int64_t c = 0;
  for (; c + 16 <= n; c += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[c + l] * b[c + l];
  for (; c < n; ++c) part[c % 16] += a[c] * b[c];
  float acc = 0.0f;
  for (int l = 0; l < 16; ++l) acc += part[l];
  return acc;
}

// The CPU's own float vector (GCC/Clang vector extension): 16 lanes with AVX-512, 8 with AVX, else 4. A type
// wider than the registers is lowered through the stack: on an AVX2 host a 16-lane type made the walk below
// 4-5x slower than this.
#if defined(__AVX512F__)
#define JAXSAE_LANES 16
#elif defined(__AVX__)
#define JAXSAE_LANES 8
#else
#define JAXSAE_LANES 4
#endif
constexpr int kLanes = JAXSAE_LANES;
typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef float VecU __attribute__((vector_size(4 * kLanes), aligned(4)));  // for unaligned loads and stores
typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));

inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }
inline float Sum(Vec v) {  // a tree of halves: log2(lanes) dependent adds, not lanes - 1
#if JAXSAE_LANES == 16
  V8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif JAXSAE_LANES == 8
  V8 h = v;
#endif
#if JAXSAE_LANES >= 8
  V4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#else
  V4 q = v;
#endif
  return (q[0] + q[2]) + (q[1] + q[3]);
}

ffi::Error CheckIndices(const int32_t* idx, int64_t n, int64_t m) {
  for (int64_t t = 0; t < n; ++t)
    if (idx[t] < 0 || idx[t] >= m) return ffi::Error::InvalidArgument("a latent index is out of range");
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- the TopK encoder: matmul and top-k fused
//
// vals, idx [S, B, k] = top-k of each row of x W_s + b_s, and x W is never stored whole. XLA:CPU's matmul writes
// a [B, M] pre-activation (75 MB at B = 4096, M = 4608) that the top-k reads back; here each task multiplies
// kMc rows of x into a [kMc, M] block (in L3) and hands its rows to TopKRow at once. The product is computed in
// the manner of BLIS: W packed into panels of kNr columns ([depth][kNr], contiguous), the task's rows into
// panels of kMr rows ([depth][kMr]), and each kMr x kNr tile summed in registers over a depth block of at most
// kKcMax, the W panel in L1 while the task's row panels pass by from L2. On a 2-core AVX2 host this ran the
// SAE encoder's shape as fast as numpy's OpenBLAS and 10% faster than XLA's matmul plus the top-k (exploration
// runs; tasks of 12 rows, whose [12, M] block stays in L2, were 25-30% slower). The sums run in another order
// than XLA's dot, so a value may differ from its matmul's in the last bits.
#if defined(__AVX512F__)
inline Vec Splat(const float* p) { return (Vec)_mm512_set1_ps(*p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return (Vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#elif defined(__AVX__)
inline Vec Splat(const float* p) { return (Vec)_mm256_broadcast_ss(p); }  // `Vec{} + *p` adds a real 0.0 first
#if defined(__FMA__)
inline Vec Fma(Vec a, Vec b, Vec c) { return (Vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
inline Vec Fma(Vec a, Vec b, Vec c) { return a * b + c; }
#endif
#else
inline Vec Splat(const float* p) { return Vec{*p, *p, *p, *p}; }
inline Vec Fma(Vec a, Vec b, Vec c) { return a * b + c; }
#endif

constexpr int kMr = 6, kNr = 2 * kLanes;  // a 6 x 2-vector tile: 12 accumulators, 2 B loads, 1 splat register
constexpr int64_t kMc = 28 * kMr;         // rows per task: their panels (194 KB at depth 288) stay in L2
constexpr int64_t kKcMax = 320;           // depth per pass: a kNr panel of it (20 KB with AVX2) stays in L1

// c[r * ldc + j] (+)= sum over p < kc of a[r * ra + p * pa] * b[p * ldb + j], for r < kMr, j < kNr. The
// accumulators are named, not an array: GCC spilled an array of them to the stack on every step. Always inlined,
// so each caller's constant strides are folded into its loop.
template <bool kAdd>
__attribute__((always_inline)) inline void TileStrided(const float* a, int64_t ra, int64_t pa, const float* b,
                                                       int64_t ldb, int64_t kc, float* c, int64_t ldc) {
  Vec c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{}, c40{}, c41{}, c50{}, c51{};
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p, a += pa, b += ldb) {
    Vec b0 = Load(b), b1 = Load(b + kLanes), ar;
#define JAXSAE_ROW(r) ar = Splat(a + r * ra); c##r##0 = Fma(ar, b0, c##r##0); c##r##1 = Fma(ar, b1, c##r##1);
    JAXSAE_ROW(0) JAXSAE_ROW(1) JAXSAE_ROW(2) JAXSAE_ROW(3) JAXSAE_ROW(4) JAXSAE_ROW(5)
#undef JAXSAE_ROW
  }
  Vec rows[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < kMr; ++r, c += ldc)
    for (int h = 0; h < 2; ++h) Store(c + h * kLanes, kAdd ? Load(c + h * kLanes) + rows[r][h] : rows[r][h]);
}

// The GEMM's tile: a packed [kc][kMr], b packed [kc][kNr].
template <bool kAdd>
inline void Tile(const float* a, const float* b, int64_t kc, float* c, int64_t ldc) {
  TileStrided<kAdd>(a, 1, kMr, b, kNr, kc, c, ldc);
}

// Attention's tile, on operands as they lie: a row-major (a[r * lda + p]), b rows ldb apart.
inline void TileRows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kc, float* c, int64_t ldc) {
  TileStrided<false>(a, lda, 1, b, ldb, kc, c, ldc);
}

// Float buffers aligned to 64 bytes, so no vector load of a panel straddles two cache lines.
struct Floats {
  std::unique_ptr<float[]> raw;
  float* p;
  explicit Floats(int64_t n) : raw(new float[n + 16]), p(raw.get()) {
    p += ((64 - reinterpret_cast<uintptr_t>(p) % 64) % 64) / sizeof(float);
  }
};

// A thread's own 64-byte-aligned scratch of at least n floats (one per tag), kept between calls: a fresh
// multi-MB buffer per call came from mmap, and faulting its pages in cost about as much as a small matmul.
template <int kTag>
float* Scratch(int64_t n) {
  thread_local std::unique_ptr<float[]> raw;
  thread_local int64_t size = 0;
  if (size < n) raw.reset(new float[(size = n) + 16]);
  float* p = raw.get();
  return p + ((64 - reinterpret_cast<uintptr_t>(p) % 64) % 64) / sizeof(float);
}

struct Depth {  // the depth blocks: n passes of at most kKcMax, as even as possible (one empty pass for d = 0)
  int64_t n, kc;
  explicit Depth(int64_t d)
      : n(std::max<int64_t>(1, (d + kKcMax - 1) / kKcMax)), kc(std::max<int64_t>(1, (d + n - 1) / n)) {}
  int64_t Len(int64_t t, int64_t d) const { return std::min(kc, d - t * kc); }
};

// W [D, M] into panels: depth block t at Wp + t * kc * Mp, panel j within it at + j * kNr * len, [len][kNr].
void PackPanels(ffi::ThreadPool& pool, const float* W, int64_t d, int64_t m, const Depth& depth, float* Wp) {
  int64_t panels = (m + kNr - 1) / kNr, mp = panels * kNr;
  ParallelFor(pool, panels, Workers(pool, d * m), [&](int64_t j, int64_t) {
    int64_t cols = std::min<int64_t>(kNr, m - j * kNr);
    for (int64_t t = 0; t < depth.n; ++t) {
      int64_t len = depth.Len(t, d);
      float* dst = Wp + t * depth.kc * mp + j * kNr * len;
      for (int64_t p = 0; p < len; ++p, dst += kNr) {
        const float* src = W + (t * depth.kc + p) * m + j * kNr;
        if (cols == kNr) {
          Store(dst, Load(src));
          Store(dst + kLanes, Load(src + kLanes));
        } else {
          for (int64_t q = 0; q < kNr; ++q) dst[q] = q < cols ? src[q] : 0.0f;
        }
      }
    }
  });
}

// The [kMc, Mp] block C = x[rows] W of `rows` <= kMc rows of x (the rest of the block's rows are zeros times W).
// One row tile for one depth block: columns k0..k0+len of x's first kMr rows into a [len][kMr] panel, zeros in
// place of rows at or past `rows`.
void PackTile(const float* x, int64_t rows, int64_t d, int64_t k0, int64_t len, float* dst) {
  for (int64_t p = 0; p < len; ++p)
    for (int r = 0; r < kMr; ++r) dst[p * kMr + r] = r < rows ? x[r * d + k0 + p] : 0.0f;
}

void BlockProduct(const float* x, int64_t rows, int64_t d, int64_t mp, const Depth& depth, const float* Wp,
                  float* Ap, float* C) {
  for (int64_t t = 0; t < depth.n; ++t) {
    int64_t len = depth.Len(t, d), k0 = t * depth.kc;
    for (int64_t i = 0; i < kMc / kMr; ++i) PackTile(x + i * kMr * d, rows - i * kMr, d, k0, len, Ap + i * len * kMr);
    const float* panels = Wp + k0 * mp;
    for (int64_t j = 0; j < mp / kNr; ++j)
      for (int64_t i = 0; i < kMc / kMr; ++i) {
        float* c = C + i * kMr * mp + j * kNr;
        if (t == 0) Tile<false>(Ap + i * len * kMr, panels + j * kNr * len, len, c, mp);
        else Tile<true>(Ap + i * len * kMr, panels + j * kNr * len, len, c, mp);
      }
  }
}

ffi::Error EncodeTopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W,
                          ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> vals,
                          ffi::ResultBuffer<ffi::S32> idx) {
  auto xd = x.dimensions(), wd = W.dimensions(), bd = bias.dimensions(), vd = vals->dimensions();
  if (xd.size() != 3 || wd.size() != 3 || bd.size() != 2 || vd.size() != 3)
    return ffi::Error::InvalidArgument("encode_top_k: x [X, B, D], W [S, D, M], bias [S, M] and [S, B, k]");
  int64_t X = xd[0], B = xd[1], d = xd[2], S = wd[0], m = wd[2], k = vd[2];
  if ((X != 1 && X != S) || wd[1] != d || bd[0] != S || bd[1] != m || vd[0] != S || vd[1] != B)
    return ffi::Error::InvalidArgument("encode_top_k: shapes do not fit x [1 or S, B, D], W [S, D, M], bias [S, M]");
  if (k < 1 || k > m) return ffi::Error::InvalidArgument("encode_top_k: k must be in [1, M]");
  if (S == 0 || B == 0) return ffi::Error::Success();
  int64_t mp = (m + kNr - 1) / kNr * kNr, tasks = (B + kMc - 1) / kMc;
  int64_t workers = std::min(tasks, Workers(pool, B * d * m));
  int64_t cap = std::max<int64_t>(4 * k, 64);
  Depth depth(d);
  Floats Wp(d * mp);
  std::vector<Floats> Ap, C;
  std::vector<std::vector<Entry>> bufs(workers, std::vector<Entry>(cap + 16));
  for (int64_t w = 0; w < workers; ++w) Ap.emplace_back(kMc * depth.kc), C.emplace_back(kMc * mp);
  for (int64_t s = 0; s < S; ++s) {
    const float* xs = x.typed_data() + (X == 1 ? 0 : s * B * d);
    const float* bs = bias.typed_data() + s * m;
    PackPanels(pool, W.typed_data() + s * d * m, d, m, depth, Wp.p);
    ParallelFor(pool, tasks, workers, [&](int64_t task, int64_t slot) {
      int64_t r0 = task * kMc, rows = std::min(kMc, B - r0);
      BlockProduct(xs + r0 * d, rows, d, mp, depth, Wp.p, Ap[slot].p, C[slot].p);
      for (int64_t r = 0; r < rows; ++r) {
        int64_t out = (s * B + r0 + r) * k;
        TopKRow<true>(C[slot].p + r * mp, bs, m, k, cap, bufs[slot].data(), vals->typed_data() + out,
                      idx->typed_data() + out);
      }
    });
  }
  return ffi::Error::Success();
}

// out [R, N] = x [R, D] W [D, N]: the same panels and tiles as the encoder above, as a plain matmul (lime_jax's
// inference forward on XLA:CPU). x is packed once, like W, and tasks are blocks of at most kMc rows times groups
// of panels, at least 8 tasks per worker (so a worker that starts late still finds a share). On SmolLM2's
// forward (exploration runs on a 2-core Zen 3) packing x per task instead, or splitting rows only, ran the
// 512-row projections 7-13% slower than XLA's dots; this layout is at par there and 11-14% ahead at 2,048 rows.
// A task's tiles are written to `out` in place, the ragged ones (rows past R, columns past N) through a buffer.
void EdgeTile(const float* a, const float* b, int64_t kc, bool add, float* c, int64_t ldc, int64_t rows,
              int64_t cols) {
  alignas(64) float tmp[kMr * kNr] = {0.0f};
  if (add)
    for (int64_t r = 0; r < rows; ++r) std::copy(c + r * ldc, c + r * ldc + cols, tmp + r * kNr);
  if (add) Tile<true>(a, b, kc, tmp, kNr);
  else Tile<false>(a, b, kc, tmp, kNr);
  for (int64_t r = 0; r < rows; ++r) std::copy(tmp + r * kNr, tmp + r * kNr + cols, c + r * ldc);
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W,
                      ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = W.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || xd[1] != wd[0] || od[0] != xd[0] || od[1] != wd[1])
    return ffi::Error::InvalidArgument("matmul: x [R, D], W [D, N] and out [R, N]");
  int64_t R = xd[0], d = xd[1], n = wd[1];
  float* po = out->typed_data();
  if (R == 0 || n == 0) return ffi::Error::Success();
  if (d == 0) {
    std::fill(po, po + R * n, 0.0f);
    return ffi::Error::Success();
  }
  int64_t panels = (n + kNr - 1) / kNr, mp = panels * kNr;
  int64_t workers = Workers(pool, R * d * n);
  // Row blocks of at most kMc rows, equal and of whole tiles, times groups of panels.
  int64_t row_tasks = (R + kMc - 1) / kMc;
  int64_t rb = ((R + row_tasks - 1) / row_tasks + kMr - 1) / kMr * kMr;
  row_tasks = (R + rb - 1) / rb;
  int64_t groups = std::min(panels, (8 * workers + row_tasks - 1) / row_tasks);
  int64_t per_group = (panels + groups - 1) / groups;
  groups = (panels + per_group - 1) / per_group;
  Depth depth(d);
  float* Wp = Scratch<0>(d * mp);
  PackPanels(pool, W.typed_data(), d, n, depth, Wp);
  // x packed once too (row tiles [len][kMr] per depth block, zeros past R), so that tasks sharing rows share it.
  int64_t tiles = (R + kMr - 1) / kMr, rp = tiles * kMr;
  float* Ap = Scratch<1>(d * rp);
  const float* px = x.typed_data();
  ParallelFor(pool, tiles, Workers(pool, R * d), [&](int64_t i, int64_t) {
    for (int64_t t = 0; t < depth.n; ++t) {
      int64_t len = depth.Len(t, d), k0 = t * depth.kc;
      PackTile(px + i * kMr * d, R - i * kMr, d, k0, len, Ap + k0 * rp + i * len * kMr);
    }
  });
  ParallelFor(pool, row_tasks * groups, workers, [&](int64_t task, int64_t) {
    int64_t i0 = (task / groups) * (rb / kMr), i1 = std::min(tiles, i0 + rb / kMr);
    int64_t j0 = (task % groups) * per_group, j1 = std::min(panels, j0 + per_group);
    for (int64_t t = 0; t < depth.n; ++t) {
      int64_t len = depth.Len(t, d), k0 = t * depth.kc;
      const float *ap = Ap + k0 * rp, *wp = Wp + k0 * mp;
      for (int64_t j = j0; j < j1; ++j) {
        int64_t cols = std::min<int64_t>(kNr, n - j * kNr);
        for (int64_t i = i0; i < i1; ++i) {
          float* c = po + i * kMr * n + j * kNr;
          const float *a = ap + i * len * kMr, *b = wp + j * kNr * len;
          int64_t tile_rows = std::min<int64_t>(kMr, R - i * kMr);
          if (tile_rows < kMr || cols < kNr) EdgeTile(a, b, len, t > 0, c, n, tile_rows, cols);
          else if (t == 0) Tile<false>(a, b, len, c, n);
          else Tile<true>(a, b, len, c, n);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- causal attention (inference forward)
//
// o [B, T, N, H] = softmax(rope(q) rope(k)^T / sqrt(H), causal) v for q [B, T, N, H], k and v [B, T, K, H]
// (grouped queries: head n reads KV head n / (N / K)), rotate-half RoPE from cos and sin [T, H/2]. Token-major
// in and out, the layout of the projections around it, so no head-major copies are made. XLA:CPU ran
// SmolLM2's attention (T = 128, H = 64) as two batched dots and a softmax at ~35 GFLOP/s, the full T x T.
// Here a task is one (batch, KV head) and its N / K query heads: the rotated keys are packed once into kNr-key
// panels [H][kNr] and the values copied to rows padded to whole panels, and each tile of kMr query rows is one
// TileRows per key panel up to the causal edge, a softmax over its rows, and one TileRows per value panel over
// the keys the tile can see (a third of XLA's time on SmolLM2's shape in exploration runs; the strided q, k and v rows
// are prefetched, which took a fifth off).

// e^x for x <= 88.7 (Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n).
inline Vec Exp(Vec x) {
  typedef int32_t VecI __attribute__((vector_size(4 * kLanes)));
  const Vec lo = Vec{} - 87.33654f;
  x = x < lo ? lo : x;
  Vec fn = x * 1.44269504088896341f + 0.5f;
  VecI n = __builtin_convertvector(fn, VecI);
  n += (__builtin_convertvector(n, Vec) > fn);  // truncation to floor: -1 where it rounded up
  Vec nf = __builtin_convertvector(n, Vec);
  Vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (Vec)((n + 127) << 23);
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                         ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), cd = cos.dimensions(), sd = sin.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || cd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("attention: q [B, T, N, H], k and v [B, T, K, H], cos and sin [T, H/2]");
  int64_t B = qd[0], T = qd[1], N = qd[2], H = qd[3], K = kd[2], H2 = H / 2;
  if (H % 2 || K == 0 || N % K || kd[0] != B || kd[1] != T || kd[3] != H || vd[0] != B || vd[1] != T ||
      vd[2] != K || vd[3] != H || cd[0] != T || cd[1] != H2 || sd[0] != T || sd[1] != H2)
    return ffi::Error::InvalidArgument("attention: shapes do not fit q [B, T, N, H], k and v [B, T, K, H], "
                                       "cos and sin [T, H/2], H even, N a multiple of K");
  if (B * T * N * H == 0) return ffi::Error::Success();
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const float *pc = cos.typed_data(), *ps = sin.typed_data();
  float* po = out->typed_data();
  int64_t kp = (T + kNr - 1) / kNr, tp = kp * kNr;  // key panels, keys padded to whole panels
  int64_t hp = (H + kNr - 1) / kNr, hpad = hp * kNr;  // value panels, head columns padded likewise
  float scale = 1.0f / std::sqrt(static_cast<float>(H));
  // A rotated row: r[h] = x[h] c[h] - x[h + H/2] s[h], r[h + H/2] = x[h + H/2] c[h] + x[h] s[h], times `mul`.
  auto rotate = [&](const float* x, int64_t t, float mul, float* r, int64_t stride) {
    const float *c = pc + t * H2, *s = ps + t * H2;
    for (int64_t h = 0; h < H2; ++h) {
      r[h * stride] = (x[h] * c[h] - x[h + H2] * s[h]) * mul;
      r[(h + H2) * stride] = (x[h + H2] * c[h] + x[h] * s[h]) * mul;
    }
  };
  int64_t G = N / K;
  ParallelFor(pool, B * K, Workers(pool, B * N * T * T * H), [&](int64_t task, int64_t) {
    int64_t b = task / K, kv = task % K;
    float* Kp = Scratch<2>(H * tp + tp * hpad + kMr * H + kMr * tp + kMr * hpad);
    float *V = Kp + H * tp, *Q = V + tp * hpad, *S = Q + kMr * H, *O = S + kMr * tp;
    std::fill(Kp, Kp + H * tp, 0.0f);  // padded keys score 0 and are masked
    for (int64_t j = 0; j < T; ++j) {
      const float *kj = pk + ((b * T + j) * K + kv) * H, *vj = pv + ((b * T + j) * K + kv) * H;
      for (int64_t h = 0; j + 4 < T && h < H; h += 16) {  // rows lie K H floats apart: fetch ahead
        __builtin_prefetch(kj + 4 * K * H + h);
        __builtin_prefetch(vj + 4 * K * H + h);
      }
      rotate(kj, j, 1.0f, Kp + (j / kNr) * H * kNr + j % kNr, kNr);
      std::copy(vj, vj + H, V + j * hpad);
      std::fill(V + j * hpad + H, V + (j + 1) * hpad, 0.0f);
    }
    for (int64_t g = 0; g < G; ++g) {
      int64_t n = kv * G + g;
      for (int64_t t0 = 0; t0 < T; t0 += kMr) {
        int64_t rows = std::min<int64_t>(kMr, T - t0), seen = t0 + rows, panels = (seen + kNr - 1) / kNr;
        for (int64_t r = 0; r < rows; ++r) rotate(pq + ((b * T + t0 + r) * N + n) * H, t0 + r, scale, Q + r * H, 1);
        for (int64_t r = t0 + kMr; r < std::min(T, t0 + 2 * kMr); ++r)
          for (int64_t h = 0; h < H; h += 16) __builtin_prefetch(pq + ((b * T + r) * N + n) * H + h);
        std::fill(Q + rows * H, Q + kMr * H, 0.0f);
        for (int64_t j = 0; j < panels; ++j) TileRows(Q, H, Kp + j * H * kNr, kNr, H, S + j * kNr, tp);
        float inv[kMr];
        for (int64_t r = 0; r < rows; ++r) {  // S's row r becomes exp(s - max) over keys <= t, zeros after
          float* s = S + r * tp;
          int64_t t = t0 + r, whole = (t + 1) / kLanes * kLanes;
          Vec mv = Vec{} + s[0];
          for (int64_t j = 0; j < whole; j += kLanes) {
            Vec x = Load(s + j);
            mv = x > mv ? x : mv;
          }
          float m = mv[0];
          for (int l = 1; l < kLanes; ++l) m = std::max(m, mv[l]);
          for (int64_t j = whole; j <= t; ++j) m = std::max(m, s[j]);
          Vec sum{};
          for (int64_t j = 0; j < panels * kNr; j += kLanes) {
            Vec e = Exp(Load(s + j) - m);
            if (j + kLanes > t + 1)
              for (int l = 0; l < kLanes; ++l) e[l] = j + l <= t ? e[l] : 0.0f;
            Store(s + j, e);
            sum += e;
          }
          inv[r] = 1.0f / Sum(sum);
        }
        for (int64_t h = 0; h < hp; ++h) TileRows(S, tp, V + h * kNr, hpad, seen, O + h * kNr, hpad);
        for (int64_t r = 0; r < rows; ++r) {
          float* o = po + ((b * T + t0 + r) * N + n) * H;
          for (int64_t h = 0; h < H; ++h) o[h] = O[r * hpad + h] * inv[r];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// Leading "seed" axis of the [S, ...] operands below: S = 1 for rank-2 ones.
inline int64_t Seeds(const ffi::Buffer<ffi::S32>& idx) {
  auto dims = idx.dimensions();
  return dims.size() == 3 ? dims[0] : 1;
}

// out[s, b, j] = a[s, b] · W[s, idx[s, b, j]]: the gradient reaching each selected latent from a [B, D]
// cotangent, for S seeds.
void GatherDot(ffi::ThreadPool& pool, const float* pa, const float* pW, const int32_t* pi, int64_t S, int64_t rows,
               int64_t k, int64_t m, int64_t d, float* po) {
  int64_t workers = Workers(pool, S * rows * k * d);
  int64_t per = std::max<int64_t>(1, S * rows / (8 * workers));
  ParallelFor(pool, (S * rows + per - 1) / per, workers, [&](int64_t t, int64_t) {
    for (int64_t sb = t * per; sb < std::min(S * rows, (t + 1) * per); ++sb) {
      const float* Ws = pW + (sb / rows) * m * d;
      for (int64_t j = 0; j < k; ++j)
        po[sb * k + j] = Dot(pa + sb * d, Ws + static_cast<int64_t>(pi[sb * k + j]) * d, d);
    }
  });
}

// Column blocks of the [M, D] scatter targets: each worker accumulates one block at a time in a packed
// [M, kWidth] buffer of its own (cache-sized, no races; writing the strided [M, D] rows directly costs a TLB
// miss per update), then copies it out. 32 columns: 16 was slower, 48-96 no faster (M = 4608, D = 576).
constexpr int64_t kWidth = 32;
constexpr int kVecs = kWidth / kLanes;  // vectors per block row

// For each seed s: out[s][i] = Σ coef[s, b, j] · (rows[r, b] − sub[s]) over (b, j) with idx[s, b, j] = i, and
// sums[s][i] = Σ coef[s, b, j] likewise; r = s, or 0 when all seeds share one batch (`shared`: rows [1, B, D]);
// sub may be null (zero), and sums too (not formed). `transpose` writes out[s] as [D, M] (the encoder weight's own
// layout) instead of [M, D].
void ScatterRows(ffi::ThreadPool& pool, const int32_t* pi, const float* pc, const float* pr, const float* psub,
                 int64_t S, int64_t rows, int64_t k, int64_t d, int64_t m, bool shared, bool transpose, float* po,
                 float* ps) {
  int64_t workers = Workers(pool, S * rows * k * d);
  int64_t n_blocks = (d + kWidth - 1) / kWidth;
  std::vector<std::vector<float>> acc(workers, std::vector<float>(m * kWidth));
  ParallelFor(pool, S * n_blocks, workers, [&](int64_t task, int64_t slot) {
    int64_t s = task / n_blocks, c0 = (task % n_blocks) * kWidth, w = std::min(d, c0 + kWidth) - c0;
    const int32_t* pis = pi + s * rows * k;
    const float* pcs = pc + s * rows * k;
    const float* prs = pr + (shared ? 0 : s) * rows * d;
    alignas(64) float off[kWidth] = {0.0f};
    if (psub) std::copy(psub + s * d + c0, psub + s * d + c0 + w, off);
    float* a = acc[slot].data();
    std::fill(a, a + m * kWidth, 0.0f);
    alignas(64) float r[kWidth] = {0.0f};
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t c = 0; c < w; ++c) r[c] = prs[b * d + c0 + c] - off[c];
      Vec rv[kVecs];  // columns past w stay 0 and add nothing
      for (int q = 0; q < kVecs; ++q) rv[q] = Load(r + q * kLanes);
      for (int64_t j = 0; j < k; ++j) {
        float* ai = a + static_cast<int64_t>(pis[b * k + j]) * kWidth;
        float v = pcs[b * k + j];
        for (int q = 0; q < kVecs; ++q) Store(ai + q * kLanes, Load(ai + q * kLanes) + v * rv[q]);
      }
    }
    float* os = po + s * m * d;
    if (transpose) {
      for (int64_t c = 0; c < w; ++c)
        for (int64_t i = 0; i < m; ++i) os[(c0 + c) * m + i] = a[i * kWidth + c];
    } else {
      for (int64_t i = 0; i < m; ++i) std::copy(a + i * kWidth, a + i * kWidth + w, os + i * d + c0);
    }
  });
  if (!ps) return;
  std::fill(ps, ps + S * m, 0.0f);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = 0; t < rows * k; ++t) ps[s * m + pi[s * rows * k + t]] += pc[s * rows * k + t];
}

// Operands carry a leading seed axis S (rank 3), or none (rank 2, S = 1).
inline int64_t Rows(const ffi::Buffer<ffi::S32>& idx) { return idx.dimensions()[idx.dimensions().size() - 2]; }
inline int64_t Cols(const ffi::AnyBuffer::Dimensions& dims) { return dims[dims.size() - 1]; }

// A TopK decoder's sparse gradients from g, the gradient reaching x̂: dv[s, b, j] = g[s, b] · W[s, idx[s, b, j]]
// and dW[s][idx[s, b, j]] += coef[s, b, j] · g[s, b]. One call, so that XLA orders every read of W here before
// the in-place optimiser update that follows from dW (two calls left one unordered, and XLA copied W each step).
ffi::Error DecoderGradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> W,
                            ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> dv,
                            ffi::ResultBuffer<ffi::F32> dW) {
  int64_t S = Seeds(idx), rows = Rows(idx), k = Cols(idx.dimensions()), d = Cols(W.dimensions());
  int64_t m = W.dimensions()[W.dimensions().size() - 2];
  const int32_t* pi = idx.typed_data();
  if (auto e = CheckIndices(pi, S * rows * k, m); e.failure()) return e;
  GatherDot(pool, g.typed_data(), W.typed_data(), pi, S, rows, k, m, d, dv->typed_data());
  ScatterRows(pool, pi, coef.typed_data(), g.typed_data(), nullptr, S, rows, k, d, m, false, false,
              dW->typed_data(), nullptr);
  return ffi::Error::Success();
}

// A TopK encoder's sparse gradients from dpre, the gradient reaching the selected pre-activations of
// (x − b) W + c: dW[s] ([D, M], W's layout) += dpre[s, b, j] · (x[r, b] − b[s]) into column idx[s, b, j],
// dc[s] likewise (the bias), and Wdc[s] = W[s] dc[s], the mat-vec that gives b's gradient (−Wdc). The mat-vec reads
// W in this call for the reason DecoderGrads gathers it. x is [1, B, D] when all seeds share it (r = 0).
ffi::Error EncoderGradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> dpre,
                            ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> W,
                            ffi::ResultBuffer<ffi::F32> dW, ffi::ResultBuffer<ffi::F32> dc,
                            ffi::ResultBuffer<ffi::F32> Wdc) {
  int64_t S = Seeds(idx), rows = Rows(idx), k = Cols(idx.dimensions()), d = Cols(x.dimensions());
  int64_t m = Cols(W.dimensions());
  const int32_t* pi = idx.typed_data();
  if (auto e = CheckIndices(pi, S * rows * k, m); e.failure()) return e;
  bool shared = x.dimensions().size() == 3 && x.dimensions()[0] == 1 && S > 1;
  float* pdc = dc->typed_data();
  ScatterRows(pool, pi, dpre.typed_data(), x.typed_data(), b.typed_data(), S, rows, k, d, m, shared, true,
              dW->typed_data(), pdc);
  const float* pW = W.typed_data();
  float* pWdc = Wdc->typed_data();
  ParallelFor(pool, S * d, Workers(pool, S * d * m), [&](int64_t t, int64_t) {
    pWdc[t] = Dot(pW + t * m, pdc + (t / d) * m, m);
  });
  return ffi::Error::Success();
}

// HierarchicalTopK's backward walk (jaxsae.htopk._walk_back, same recurrences): per row, from the last
// prefix to the first, with r the residual after prefix k+1 and G its suffix-summed loss gradient,
//   G += coef[k]·r;  dv[b, k] = G · W[idx[b, k]];  sse[k] += r·r;  dW[idx[b, k]] += vals[b, k]·G;
//   r -= vals[b, k]·W[idx[b, k]].
// Every update is column-wise, so workers take column blocks (as ScatterRows) and their dv and sse shares are
// summed at the end. A worker's two [M, kWidth] buffers (1.2 MB at M = 4608) outgrow a 512 KiB L2, where the
// walk waits on their random rows: fetching the rows kAhead prefixes ahead took 8-26% off it there (AVX2 host,
// K = 32-128, unguarded runs); 2-6 ahead did about as well, 8-16 less.
constexpr int64_t kAhead = 4;
ffi::Error HTopKWalkImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::S32> idx,
                         ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> rK, ffi::Buffer<ffi::F32> coef,
                         ffi::Buffer<ffi::F32> ct_r, ffi::ResultBuffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> dW,
                         ffi::ResultBuffer<ffi::F32> G, ffi::ResultBuffer<ffi::F32> sse) {
  int64_t m = W.dimensions()[0], d = W.dimensions()[1];
  int64_t rows = idx.dimensions()[0], k = idx.dimensions()[1];
  const float *pv = vals.typed_data(), *pW = W.typed_data(), *pr = rK.typed_data(), *pc = coef.typed_data();
  const float* pct = ct_r.typed_data();
  const bool has_ct = ct_r.dimensions()[0] != 0;  // ct_r [0, D]: a zero cotangent, not read
  const bool sum_G = G->dimensions()[0] == 1;  // G [1, D]: only its column sums, Σ_b G[b]
  const int32_t* pi = idx.typed_data();
  float *pdv = dv->typed_data(), *pdW = dW->typed_data(), *pG = G->typed_data(), *psse = sse->typed_data();
  if (auto e = CheckIndices(pi, rows * k, m); e.failure()) return e;
  int64_t workers = Workers(pool, rows * k * d);
  // Per worker: the [M, kWidth] dW accumulator, then the block's columns of W packed the same way.
  std::vector<std::vector<float>> acc(workers, std::vector<float>(2 * m * kWidth));
  std::vector<std::vector<float>> dv_part(workers, std::vector<float>(rows * k, 0.0f));
  std::vector<std::vector<double>> sse_part(workers, std::vector<double>(k, 0.0));
  ParallelFor(pool, (d + kWidth - 1) / kWidth, workers, [&](int64_t blk, int64_t slot) {
    int64_t c0 = blk * kWidth, w = std::min(d, c0 + kWidth) - c0;
    float* a = acc[slot].data();
    float* dvp = dv_part[slot].data();
    double* ssep = sse_part[slot].data();
    float* Wp = a + m * kWidth;
    std::fill(a, a + 2 * m * kWidth, 0.0f);
    for (int64_t i = 0; i < m; ++i) std::copy(pW + i * d + c0, pW + i * d + c0 + w, Wp + i * kWidth);
    // A short last block is zero-padded to kWidth (zero columns add nothing), so each row's r and G live in
    // registers for the whole walk; sse is summed per lane and reduced once at the end.
    std::vector<Vec> sse_lanes(k, Vec{});
    Vec g_sum[kVecs] = {};
    for (int64_t b = 0; b < rows; ++b) {
      alignas(64) float r_in[kWidth] = {0.0f}, g_in[kWidth] = {0.0f};
      std::copy(pr + b * d + c0, pr + b * d + c0 + w, r_in);
      if (has_ct) std::copy(pct + b * d + c0, pct + b * d + c0 + w, g_in);
      Vec r[kVecs], g[kVecs];
      for (int q = 0; q < kVecs; ++q) r[q] = Load(r_in + q * kLanes), g[q] = Load(g_in + q * kLanes);
      for (int64_t j = k - 1; j >= 0; --j) {
        int64_t i = pi[b * k + j];
        float v = pv[b * k + j], cf = pc[j];
        if (j >= kAhead) {  // the rows kAhead prefixes on: their two lines each of W and dW
          const int64_t ia = pi[b * k + j - kAhead] * kWidth;
          for (int64_t line = 0; line < kWidth; line += 16) {  // 16 floats per 64-byte line
            __builtin_prefetch(Wp + ia + line);
            __builtin_prefetch(a + ia + line, 1);
          }
        }
        const float* wr = Wp + i * kWidth;
        float* ai = a + i * kWidth;
        Vec dot{}, sq{};
        for (int q = 0; q < kVecs; ++q) {
          Vec wq = Load(wr + q * kLanes);
          g[q] += cf * r[q];
          dot += g[q] * wq;
          sq += r[q] * r[q];
          Store(ai + q * kLanes, Load(ai + q * kLanes) + v * g[q]);
          r[q] -= v * wq;
        }
        dvp[b * k + j] += Sum(dot);
        sse_lanes[j] += sq;
      }
      if (sum_G) {
        for (int q = 0; q < kVecs; ++q) g_sum[q] += g[q];
        continue;
      }
      alignas(64) float g_out[kWidth];
      for (int q = 0; q < kVecs; ++q) Store(g_out + q * kLanes, g[q]);
      std::copy(g_out, g_out + w, pG + b * d + c0);
    }
    if (sum_G) {
      alignas(64) float g_out[kWidth];
      for (int q = 0; q < kVecs; ++q) Store(g_out + q * kLanes, g_sum[q]);
      std::copy(g_out, g_out + w, pG + c0);
    }
    for (int64_t j = 0; j < k; ++j) ssep[j] += Sum(sse_lanes[j]);
    for (int64_t i = 0; i < m; ++i) std::copy(a + i * kWidth, a + i * kWidth + w, pdW + i * d + c0);
  });
  for (int64_t t = 0; t < rows * k; ++t) {
    float s = 0.0f;
    for (int64_t wk = 0; wk < workers; ++wk) s += dv_part[wk][t];
    pdv[t] = s;
  }
  for (int64_t j = 0; j < k; ++j) {
    double s = 0.0;
    for (int64_t wk = 0; wk < workers; ++wk) s += sse_part[wk][j];
    psse[j] = static_cast<float>(s);
  }
  return ffi::Error::Success();
}


// A mix over sources: out[k] = Σ_j Σ_r w[k, r, j] · src_j[r] for sources src_j [R, X] (any trailing shape,
// flattened), w [K, R, J] (J >= the number of sources; later columns unused), out [K, X]. LIMe v2's K/V head mix
// over depth: XLA runs it as one small [K, R] x [R, X] dot per source, each writing a full [K, X] partial sum;
// here a block of columns is done at once, the K outputs (up to 8 at a time) held in registers while every
// source row streams through once.
constexpr int64_t kMixBlock = 1024;
constexpr int kMixTile = 8;  // outputs (forward) or output heads (backward) held in registers at once

struct MixArgs {
  const float* w;              // [K, R, J]
  int64_t K, R, J, n, X;
  std::vector<const float*> src;  // n of [R, X]
  float Weight(int64_t k, int64_t r, int64_t j) const { return w[(k * R + r) * J + j]; }
};

// Outputs k0 .. k0 + KT - 1 over columns x0 .. x0 + len - 1.
template <int KT>
void MixTile(const MixArgs& a, int64_t k0, int64_t x0, int64_t len, float* out) {
  int64_t x = 0;
  for (; x + kLanes <= len; x += kLanes) {
    Vec acc[KT] = {};
    for (int64_t j = 0; j < a.n; ++j)
      for (int64_t r = 0; r < a.R; ++r) {
        Vec s = Load(a.src[j] + r * a.X + x0 + x);
        for (int k = 0; k < KT; ++k) acc[k] += a.Weight(k0 + k, r, j) * s;
      }
    for (int k = 0; k < KT; ++k) Store(out + (k0 + k) * a.X + x0 + x, acc[k]);
  }
  for (; x < len; ++x)
    for (int k = 0; k < KT; ++k) {
      float acc = 0.0f;
      for (int64_t j = 0; j < a.n; ++j)
        for (int64_t r = 0; r < a.R; ++r) acc += a.Weight(k0 + k, r, j) * a.src[j][r * a.X + x0 + x];
      out[(k0 + k) * a.X + x0 + x] = acc;
    }
}

template <typename F>
void ByTile(int kt, F&& f) {  // f(std::integral_constant<int, kt>) for kt in 1..kMixTile
  switch (kt) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    default: return f(std::integral_constant<int, 8>());
  }
}

ffi::ErrorOr<MixArgs> Mixing(const ffi::Buffer<ffi::F32>& w, const ffi::RemainingArgs& sources, int64_t X) {
  auto wd = w.dimensions();
  MixArgs a{w.typed_data(), wd[0], wd[1], wd[2], static_cast<int64_t>(sources.size()), X, {}};
  if (a.n < 1 || a.n > a.J) return ffi::Unexpected(ffi::Error::InvalidArgument("mix: need 1..J sources"));
  for (int64_t j = 0; j < a.n; ++j) {
    auto b = sources.get<ffi::Buffer<ffi::F32>>(j);
    if (b.has_error()) return ffi::Unexpected(b.error());
    if (static_cast<int64_t>(b->element_count()) != a.R * X)
      return ffi::Unexpected(ffi::Error::InvalidArgument("mix: a source's size is not R times the output's / K"));
    a.src.push_back(b->typed_data());
  }
  return a;
}

ffi::Error MixImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::RemainingArgs sources,
                   ffi::ResultBuffer<ffi::F32> out) {
  auto args = Mixing(w, sources, out->element_count() / w.dimensions()[0]);
  if (args.has_error()) return args.error();
  const MixArgs& a = *args;
  float* po = out->typed_data();
  int64_t blocks = (a.X + kMixBlock - 1) / kMixBlock;
  ParallelFor(pool, blocks, Workers(pool, a.K * a.R * a.n * a.X), [&](int64_t t, int64_t) {
    int64_t x0 = t * kMixBlock, len = std::min(kMixBlock, a.X - x0);
    for (int64_t k0 = 0; k0 < a.K; k0 += kMixTile)
      ByTile(static_cast<int>(std::min<int64_t>(kMixTile, a.K - k0)),
             [&](auto kt) { MixTile<decltype(kt)::value>(a, k0, x0, len, po); });
  });
  return ffi::Error::Success();
}

// One block of the backward for heads k0 .. k0 + KT - 1: adds their part of dsrc_j[r] = Σ_k w[k, r, j] · g[k]
// (written when k0 == 0, added otherwise) and their dot products <g[k], src_j[r]> to acc [K, R, n].
template <int KT>
void MixBwdTile(const MixArgs& a, const float* g, const std::vector<float*>& ds, int64_t k0, int64_t x0,
                int64_t len, double* acc) {
  for (int64_t j = 0; j < a.n; ++j)
    for (int64_t r = 0; r < a.R; ++r) {
      const float* s = a.src[j] + r * a.X + x0;
      float* d = ds[j] + r * a.X + x0;
      float c[KT];
      for (int k = 0; k < KT; ++k) c[k] = a.Weight(k0 + k, r, j);
      Vec dot[KT] = {};
      int64_t x = 0;
      for (; x + kLanes <= len; x += kLanes) {
        Vec sv = Load(s + x), dv = k0 == 0 ? Vec{} : Load(d + x);
        for (int k = 0; k < KT; ++k) {
          Vec gk = Load(g + (k0 + k) * a.X + x0 + x);
          dv += c[k] * gk;
          dot[k] += gk * sv;
        }
        Store(d + x, dv);
      }
      float tail[KT] = {};
      for (; x < len; ++x) {
        float dv = k0 == 0 ? 0.0f : d[x];
        for (int k = 0; k < KT; ++k) {
          float gk = g[(k0 + k) * a.X + x0 + x];
          dv += c[k] * gk;
          tail[k] += gk * s[x];
        }
        d[x] = dv;
      }
      for (int k = 0; k < KT; ++k) acc[((k0 + k) * a.R + r) * a.n + j] += Sum(dot[k]) + tail[k];
    }
}

// The mix's backward: dsrc_j[r] = Σ_k w[k, r, j] · g[k] and dw[k, r, j] = <g[k], src_j[r]> (dw's columns past
// the sources are zero). Per column block, each worker adds its dot products to its own [K, R, n] sums in
// double, added up at the end.
ffi::Error MixBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> g,
                      ffi::RemainingArgs sources, ffi::ResultBuffer<ffi::F32> dw, ffi::RemainingRets dsrc) {
  auto args = Mixing(w, sources, g.element_count() / w.dimensions()[0]);
  if (args.has_error()) return args.error();
  const MixArgs& a = *args;
  if (static_cast<int64_t>(dsrc.size()) != a.n)
    return ffi::Error::InvalidArgument("mix_bwd: need as many source gradients as sources");
  std::vector<float*> ds;
  for (int64_t j = 0; j < a.n; ++j) {
    auto d = dsrc.get<ffi::Buffer<ffi::F32>>(j);
    if (d.has_error()) return d.error();
    ds.push_back((*d)->typed_data());
  }
  const float* pg = g.typed_data();
  int64_t blocks = (a.X + kMixBlock - 1) / kMixBlock;
  int64_t workers = Workers(pool, a.K * a.R * a.n * a.X), per = a.K * a.R * a.n;
  std::vector<double> sums(workers * per, 0.0);
  ParallelFor(pool, blocks, workers, [&](int64_t t, int64_t slot) {
    int64_t x0 = t * kMixBlock, len = std::min(kMixBlock, a.X - x0);
    for (int64_t k0 = 0; k0 < a.K; k0 += kMixTile)
      ByTile(static_cast<int>(std::min<int64_t>(kMixTile, a.K - k0)), [&](auto kt) {
        MixBwdTile<decltype(kt)::value>(a, pg, ds, k0, x0, len, sums.data() + slot * per);
      });
  });
  float* pdw = dw->typed_data();
  for (int64_t k = 0; k < a.K; ++k)
    for (int64_t r = 0; r < a.R; ++r)
      for (int64_t j = 0; j < a.J; ++j) {
        double total = 0.0;
        if (j < a.n)
          for (int64_t slot = 0; slot < workers; ++slot) total += sums[slot * per + (k * a.R + r) * a.n + j];
        pdw[(k * a.R + r) * a.J + j] = static_cast<float>(total);
      }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [0] or [..., M]
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeEncodeTopKF32, EncodeTopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [1 or S, B, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W [S, D, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [S, M]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // vals [S, B, k]
                                  .Ret<ffi::Buffer<ffi::S32>>()); // idx [S, B, k]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeDecoderGradsF32, DecoderGradsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g [(S,) B, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W [(S,) M, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // idx [(S,) B, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // coef [(S,) B, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dv [(S,) B, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dW [(S,) M, D]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeEncoderGradsF32, EncoderGradsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()   // idx [(S,) B, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dpre [(S,) B, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [(1 or S,) B, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b [(S,) D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W [(S,) D, M]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dW [(S,) D, M]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dc [(S,) M]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // W dc [(S,) D]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeMatmulF32, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [R, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W [D, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out [R, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeAttentionF32, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, T, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [B, T, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [B, T, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [T, H/2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [T, H/2]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // o [B, T, N, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeHTopKWalkF32, HTopKWalkImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // vals [B, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // idx [B, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_dec [M, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // r_K [B, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // coef [K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ct_r [B, D], or [0, D] for zeros
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dv [B, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dW_dec [M, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // G [B, D], or [1, D]: Σ_b G
                                  .Ret<ffi::Buffer<ffi::F32>>()); // sse [K]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeMixF32, MixImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w [K, R, J]
                                  .RemainingArgs()                // sources [R, ...] each
                                  .Ret<ffi::Buffer<ffi::F32>>()); // [K, ...]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeMixBwdF32, MixBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w [K, R, J]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g [K, ...]
                                  .RemainingArgs()                // sources [R, ...] each
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw [K, R, J]
                                  .RemainingRets());              // dsrc [R, ...] each
