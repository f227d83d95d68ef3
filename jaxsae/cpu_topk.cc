// Top-k of each row of a float32 [..., M] array for XLA:CPU, as an XLA FFI handler (see cpu_topk.py).
//
// Results equal jax.lax.top_k's: values in descending order under the total order XLA uses
// (-NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN), ties to the lower index. XLA:CPU's own TopK
// partial-sorts an index vector per row on one thread; this one finds a floor for the k-th best in one
// vectorised pass, collects what reaches it in a second, selects among those few, and splits the rows over
// XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

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
void TopKRow(const float* x, int64_t m, int64_t k, int64_t cap, Entry* buf, float* vals, int32_t* idx) {
  int64_t chunk = m / k;
  int32_t lo = INT32_MAX;
  for (int64_t j = 0; j < k; ++j) {
    int64_t end = j == k - 1 ? m : (j + 1) * chunk;
    int32_t top = INT32_MIN;
    for (int64_t i = j * chunk; i < end; ++i) top = std::max(top, Key(x[i]));
    lo = std::min(lo, top);
  }
  int64_t n = 0;
  for (int64_t i = 0; i < m; i += 16) {
    int64_t len = std::min<int64_t>(16, m - i);
    if (len == 16) {
      // One vectorised test skips the blocks with nothing at or above the floor: most of them.
      int32_t hit = 0;
      for (int j = 0; j < 16; ++j) hit |= Key(x[i + j]) >= lo;
      if (!hit) continue;
    }
    for (int64_t j = 0; j < len; ++j) {
      int32_t key = Key(x[i + j]);
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
    vals[j] = x[buf[j].idx];
    idx[j] = buf[j].idx;
  }
}

// Rows are handed out in blocks from a shared counter. The calling thread works too, so the call finishes
// even when no pool thread is free; the state is shared-owned because a late pool task may still read it.
struct Work {
  const float* x;
  float* vals;
  int32_t* idx;
  int64_t rows, m, k, block;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    int64_t cap = std::max<int64_t>(4 * k, 64);
    std::unique_ptr<Entry[]> buf(new Entry[cap + 16]);
    int64_t n_blocks = (rows + block - 1) / block;
    for (int64_t b; (b = next.fetch_add(1)) < n_blocks;) {
      int64_t end = std::min(rows, (b + 1) * block);
      for (int64_t r = b * block; r < end; ++r) TopKRow(x + r * m, m, k, cap, buf.get(), vals + r * k, idx + r * k);
      done.fetch_add(end - b * block, std::memory_order_release);
    }
  }
};

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> vals,
                    ffi::ResultBuffer<ffi::S32> idx) {
  auto dims = x.dimensions();
  auto out_dims = vals->dimensions();
  if (dims.size() == 0 || out_dims.size() != dims.size()) return ffi::Error::InvalidArgument("top_k: rank");
  int64_t m = dims.back(), k = out_dims.back();
  if (k < 1 || k > m) return ffi::Error::InvalidArgument("top_k: k must be in [1, M]");
  int64_t rows = m == 0 ? 0 : static_cast<int64_t>(x.element_count()) / m;
  if (rows == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->vals = vals->typed_data();
  work->idx = idx->typed_data();
  work->rows = rows;
  work->m = m;
  work->k = k;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About four blocks per thread balance the rows; tiny calls stay on the calling thread.
  work->block = std::max<int64_t>(1, rows / (4 * threads));
  int64_t helpers = rows * m < (1 << 16) ? 0 : std::min(threads, (rows + work->block - 1) / work->block) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < rows) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
