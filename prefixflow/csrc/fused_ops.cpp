// Fused elementwise operations of a Llama layer, each one pass over its rows instead of the
// several PyTorch operations (and dispatches) it replaces:
//
//   add_rms_norm   residual += x (when given), then RMSNorm of the sum
//   silu_and_mul   SiLU(gate) * up, from the fused gate_up projection
//   rotary         rotate-half RoPE of q and k in place, from cos/sin tables
//
// Each rounds where PyTorch's own sequence of operations rounds (to bfloat16 after every
// step, when the tensors are bfloat16), so results match the PyTorch path up to the order
// of a sum (RMSNorm's mean of squares) and the exp inside SiLU.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace {

using pf::bf2f;
using pf::f2bf;
using pf::load;
#if defined(__AVX512F__)
using pf::exp16;
using pf::load16;
#endif


template <typename T>
inline T store(float f);
template <>
inline float store<float>(float f) { return f; }
template <>
inline uint16_t store<uint16_t>(float f) { return f2bf(f); }

// The value a tensor of type T holds for f: f itself in float32, f rounded in bfloat16.
template <typename T>
inline float round_to(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else {
    return bf2f(f2bf(f));
  }
}

// offset < 0: Llama's norm, the normed value cast to T before the weight multiplies it;
// offset >= 0: Gemma's and OLMo 2's, (offset + weight) multiplied in float32, then cast.
template <typename T>
void add_rms_norm_impl(at::Tensor& out, const at::Tensor& x, c10::optional<at::Tensor>& residual,
                       const at::Tensor& weight, double eps, double offset = -1.0) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* rp = residual ? reinterpret_cast<T*>(residual->data_ptr()) : nullptr;
  const T* wp = reinterpret_cast<const T*>(weight.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * n;
      float ss = 0.f;
      if (rp) {
        T* rr = rp + r * n;
        for (int64_t i = 0; i < n; ++i) {
          const T s = store<T>(load<T>(xr, i) + load<T>(rr, i));  // the residual stream
          rr[i] = s;
          h[i] = load<T>(&s, 0);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) h[i] = load<T>(xr, i);
      }
      for (int64_t i = 0; i < n; ++i) ss += h[i] * h[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + feps);
      T* orow = op + r * n;
      if (offset >= 0.0) {
        const float off = static_cast<float>(offset);
        for (int64_t i = 0; i < n; ++i) orow[i] = store<T>(h[i] * inv * (off + load<T>(wp, i)));
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        const T normed = store<T>(h[i] * inv);  // cast to the input dtype, then the weight
        orow[i] = store<T>(load<T>(wp, i) * load<T>(&normed, 0));
      }
    }
  });
}

// out = rms_norm(x + residual) * weight, with residual updated to x + residual when given;
// offset >= 0: * (offset + weight) in float32 (add_offset_rms_norm).
at::Tensor add_rms_norm_offset(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight, double eps,
                               double offset) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (T, hidden) tensor");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous (hidden,) tensor of x's dtype");
  if (residual) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must be contiguous and shaped like x");
  }
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16) {
    add_rms_norm_impl<uint16_t>(out, x, residual, weight, eps, offset);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
    add_rms_norm_impl<float>(out, x, residual, weight, eps, offset);
  }
  return out;
}

at::Tensor add_rms_norm(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight, double eps) {
  return add_rms_norm_offset(x, residual, weight, eps, -1.0);
}

at::Tensor add_offset_rms_norm(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight, double eps,
                               double offset) {
  TORCH_CHECK(offset >= 0.0, "offset must be >= 0");
  return add_rms_norm_offset(x, residual, weight, eps, offset);
}

#if defined(__AVX512F__)

// Round 16 floats as a tensor of type T holds them (bfloat16: to nearest even; no NaNs
// arise here).
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    x = _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(-65536)));
  }
}

template <typename T>
inline void store16(T* p, __m512 v);
template <>
inline void store16<float>(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
template <>
inline void store16<uint16_t>(uint16_t* p, __m512 v) {
  // v is already rounded: its top halves are the bfloat16 values.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#endif

template <typename T>
void silu_and_mul_impl(at::Tensor& out, const at::Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  const T* gp = reinterpret_cast<const T*>(gate_up.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * 2 * n;
      const T* u = g + n;
      T* o = op + r * n;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= n; i += 16) {
        const __m512 gv = load16<T>(g + i);
        const __m512 s = round16<T>(_mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
        store16<T>(o + i, round16<T>(_mm512_mul_ps(s, load16<T>(u + i))));
      }
#endif
      for (; i < n; ++i) {
        const float gv = load<T>(g, i);
        const T s = store<T>(gv / (1.f + std::exp(-gv)));  // F.silu, in the tensor's dtype
        o[i] = store<T>(load<T>(&s, 0) * load<T>(u, i));
      }
    }
  });
}

at::Tensor silu_and_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be a contiguous (T, 2 * intermediate) tensor");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16) {
    silu_and_mul_impl<uint16_t>(out, gate_up);
  } else {
    TORCH_CHECK(gate_up.scalar_type() == at::kFloat, "gate_up must be bfloat16 or float32");
    silu_and_mul_impl<float>(out, gate_up);
  }
  return out;
}

template <typename T>
void rotary_impl(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const int64_t row_stride = x.stride(0), head_stride = x.stride(1);
  T* xp = reinterpret_cast<T*>(x.data_ptr());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(D);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * D;
      const float* s = sp + pos[t] * D;
      for (int64_t h = 0; h < H; ++h) {
        T* v = xp + t * row_stride + h * head_stride;
        for (int64_t i = 0; i < D; ++i) tmp[i] = load<T>(v, i);
        for (int64_t i = 0; i < D; ++i) {
          // q * cos + rotate_half(q) * sin, each product and the sum in the tensor's dtype,
          // with cos and sin first cast to it.
          const float rot = i < half ? -tmp[i + half] : tmp[i - half];
          const T a = store<T>(tmp[i] * round_to<T>(c[i]));
          const T b = store<T>(rot * round_to<T>(s[i]));
          v[i] = store<T>(load<T>(&a, 0) + load<T>(&b, 0));
        }
      }
    }
  });
}

// Rotate q (T, H, D) and k (T, H_kv, D) in place by their positions (cos, sin: float32 tables).
void rotary(at::Tensor q, at::Tensor k, at::Tensor positions, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions must be int64");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(1) == q.size(2),
              "cos and sin must be contiguous float32 (positions, D) tables");
  for (auto* x : {&q, &k}) {
    TORCH_CHECK(x->dim() == 3 && x->stride(2) == 1 && x->size(0) == positions.numel(), "q and k must be (T, H, D)");
    TORCH_CHECK(x->size(2) % 2 == 0, "head size must be even");
    if (x->scalar_type() == at::kBFloat16) {
      rotary_impl<uint16_t>(*x, positions, cos, sin);
    } else {
      TORCH_CHECK(x->scalar_type() == at::kFloat, "q and k must be bfloat16 or float32");
      rotary_impl<float>(*x, positions, cos, sin);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefixflow, m) {
  m.def("add_rms_norm(Tensor x, Tensor(a!)? residual, Tensor weight, float eps) -> Tensor");
  m.def("add_offset_rms_norm(Tensor x, Tensor(a!)? residual, Tensor weight, float eps, float offset) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(prefixflow, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("add_offset_rms_norm", &add_offset_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
}
