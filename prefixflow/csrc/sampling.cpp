// The heavy pass of sampling (prefixflow/sample/sampler.py): for each sampled row, the
// weights exp((x - max x) / T) of its logits and their sums over blocks of the vocabulary,
// the two levels of the row's CDF. One read of the logits and one write of the weights,
// instead of a float32 copy, a scale, a max, a subtraction, an exp and a sum in PyTorch.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_math.h"

namespace {

using pf::bf2f;
#if defined(__AVX512F__)
using pf::exp16;
#endif


template <typename T>
inline float load1(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *p;
  } else {
    return bf2f(*p);
  }
}

#if defined(__AVX512F__)

template <typename T>
inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), m, v);
  }
}
#endif

template <typename T>
void weights_impl(const at::Tensor& logits, const int64_t* rows, const float* inv_temp, float* w,
                  double* sums, int64_t R, int64_t V, int64_t block, int64_t nb) {
  const T* lp = reinterpret_cast<const T*>(logits.data_ptr());
  const int64_t stride = logits.stride(0);
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = lp + rows[r] * stride;
      const float it = inv_temp[r];
      float* wr = w + r * nb * block;
      float m = -std::numeric_limits<float>::infinity();
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 mv = _mm512_set1_ps(m);
      for (; i < V; i += 16) {
        const __mmask16 k = V - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (V - i)) - 1);
        mv = _mm512_max_ps(mv, load16<T>(x + i, k));
      }
      m = _mm512_reduce_max_ps(mv) * it;
#else
      for (; i < V; ++i) m = std::max(m, load1<T>(x + i));
      m *= it;
#endif
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t lo = b * block, hi = std::min(V, lo + block);
        float s = 0.f;
        int64_t j = lo;
#if defined(__AVX512F__)
        __m512 sv = _mm512_setzero_ps();
        const __m512 itv = _mm512_set1_ps(it), mv2 = _mm512_set1_ps(m);
        for (; j < hi; j += 16) {
          const __mmask16 k = hi - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (hi - j)) - 1);
          const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(load16<T>(x + j, k), itv, mv2)));
          _mm512_mask_storeu_ps(wr + j, k, e);
          sv = _mm512_add_ps(sv, e);
        }
        s = _mm512_reduce_add_ps(sv);
#else
        for (; j < hi; ++j) {
          const float e = std::exp(load1<T>(x + j) * it - m);
          wr[j] = e;
          s += e;
        }
#endif
        for (int64_t t = hi; t < lo + block; ++t) wr[t] = 0.f;
        sums[r * nb + b] = s;
      }
    }
  });
}

// w (R, nb * block) float32 <- exp(logits[rows] * inv_temp - max); sums (R, nb) float64.
void sampling_weights(at::Tensor logits, at::Tensor rows, at::Tensor inv_temp, at::Tensor w,
                      at::Tensor sums) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (S, V) with contiguous rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64");
  TORCH_CHECK(inv_temp.scalar_type() == at::kFloat && inv_temp.numel() == rows.numel(), "one inverse temperature per row");
  const int64_t R = rows.numel(), V = logits.size(1), nb = sums.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(0) == R, "w must be float32 (R, nb * block)");
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.is_contiguous() && sums.size(0) == R, "sums must be float64 (R, nb)");
  const int64_t block = w.size(1) / nb;
  TORCH_CHECK(block * nb == w.size(1) && block * nb >= V && block * (nb - 1) < V, "w and sums disagree on the blocks");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(rp[r] >= 0 && rp[r] < logits.size(0), "row out of range");
  if (logits.scalar_type() == at::kBFloat16) {
    weights_impl<uint16_t>(logits, rp, inv_temp.data_ptr<float>(), w.data_ptr<float>(), sums.data_ptr<double>(), R, V, block, nb);
  } else {
    TORCH_CHECK(logits.scalar_type() == at::kFloat, "logits must be bfloat16 or float32");
    weights_impl<float>(logits, rp, inv_temp.data_ptr<float>(), w.data_ptr<float>(), sums.data_ptr<double>(), R, V, block, nb);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefixflow, m) {
  m.def("sampling_weights(Tensor logits, Tensor rows, Tensor inv_temp, Tensor(a!) w, Tensor(b!) sums) -> ()");
}

TORCH_LIBRARY_IMPL(prefixflow, CPU, m) { m.impl("sampling_weights", &sampling_weights); }
