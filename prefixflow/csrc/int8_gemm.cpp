// W8A8 linear layer on AVX-512 VNNI: y = (xq . wq) * x_scale[m] * w_scale[n].
//
//   int8_pack_weight   int8 weights (N, K) -> the kernel's blocks (see below)
//   int8_linear        per-token int8 quantization of x, the int8 GEMM, the scales,
//                      the output in x's dtype; in one call
//
// vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and adds the four products to a
// 32-bit lane: 64 multiply-adds per instruction, twice what vdpbf16ps does with bfloat16.
// Activations are quantized symmetrically (xq in [-127, 127]) and shifted by 128 to be
// unsigned; sum_k (xq + 128) w = sum_k xq w + 128 sum_k w, so the shift is undone by
// subtracting 128 * sum_k w[n] (computed at packing). Every step rounds as the PyTorch
// reference (model/quant/int8.py) does: x / scale rounded half to even, exact int32 sums,
// then float32 products in the same order, so the two agree bit for bit.
//
// Weight layout: groups of 64 output channels; for each 4 consecutive k a group holds 256
// bytes, four zmm registers of 16 channels x 4 k: byte 4c + i of (group g, step q) is
// w[64 g + c, 4 q + i] (channels past N are zero). The micro-kernel keeps MR rows x 64
// channels of int32 sums in registers and walks k; threads split the groups.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_math.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

namespace {

constexpr int64_t kMaxRows = 6;    // rows of sums held in registers (MR)
constexpr int64_t kMaxBlocks = 4;  // 16-channel blocks held in registers: 64 channels

at::Tensor int8_pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_pack_weight: (N, K) int8");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 4 == 0, "int8_pack_weight: K must be a multiple of 4");
  const int64_t groups = (N + 63) / 64, kq = K / 4;
  auto wc = w.contiguous();
  auto packed = at::zeros({groups, kq, 256}, w.options());  // channels past N stay 0
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t g = n / 64, c = n % 64;  // block c / 16 of the group, lane c % 16
    for (int64_t q = 0; q < kq; ++q) {
      std::memcpy(dst + (g * kq + q) * 256 + 4 * c, src + n * K + 4 * q, 4);
    }
  }
  return packed;
}

// x (M, K) -> unsigned codes (M, K) and scales (M,): xq = round(x / (amax / 127)) + 128.
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, uint8_t* xu, float* xs) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = x + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        amax = std::max(amax, std::fabs(pf::load(row, k)));
      }
      const float s = std::max(amax / 127.f, 1e-12f);
      xs[m] = s;
      const __m512 vs = _mm512_set1_ps(s);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(pf::load16(row + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xu + m * K + k), _mm512_cvtepi32_epi8(qi));
      }
      for (; k < K; ++k) {
        const float q = std::nearbyint(pf::load(row, k) / s);
        xu[m * K + k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
      }
    }
  });
}

// MR rows from m, the 4 blocks (64 channels) from block b: sums over all of K, then the
// epilogue. The sums are 4 MR named registers: GCC spilled an array of them to the stack
// on every step of k.
#define PF_ROW(r)                                                               \
  if constexpr (MR > r) {                                                       \
    const __m512i xb = _mm512_set1_epi32(xr[r * row + q]);                      \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, xb, w0);                             \
    a##r##1 = _mm512_dpbusd_epi32(a##r##1, xb, w1);                             \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, xb, w2);                             \
    a##r##3 = _mm512_dpbusd_epi32(a##r##3, xb, w3);                             \
  }
#define PF_ZERO(r)                                                              \
  __m512i a##r##0 = _mm512_setzero_si512(), a##r##1 = _mm512_setzero_si512(),   \
          a##r##2 = _mm512_setzero_si512(), a##r##3 = _mm512_setzero_si512();
#define PF_OUT(r)                                                               \
  if constexpr (MR > r) {                                                       \
    const __m512i sums[4] = {a##r##0, a##r##1, a##r##2, a##r##3};               \
    epilogue(sums, m + r, xs, comp, ws, b, N, y);                               \
  }

template <typename T>
inline void epilogue(const __m512i* sums, int64_t m, const float* xs, const int32_t* comp,
                     const float* ws, int64_t b, int64_t N, T* y) {
  const __m512 x_scale = _mm512_set1_ps(xs[m]);
  for (int j = 0; j < kMaxBlocks; ++j) {
    const int64_t n = (b + j) * 16;
    const int64_t left = N - n;
    if (left <= 0) return;
    const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __m512i c = _mm512_maskz_loadu_epi32(mask, comp + n);
    const __m512 s = _mm512_maskz_loadu_ps(mask, ws + n);
    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[j], c));
    pf::store16(y + m * N + n, _mm512_mul_ps(_mm512_mul_ps(v, s), x_scale), mask);
  }
}

template <int MR, typename T>
void micro_kernel(const uint8_t* xu, const float* xs, int64_t m, int64_t K,
                  const int8_t* packed, const int32_t* comp, const float* ws,
                  int64_t b, int64_t N, T* y) {
  const int64_t kq = K / 4;
  PF_ZERO(0) PF_ZERO(1) PF_ZERO(2) PF_ZERO(3) PF_ZERO(4) PF_ZERO(5)
  // the 4 blocks of a group lie side by side for each q: 256 bytes
  const int8_t* wb = packed + b * kq * 64;
  const int32_t* xr = reinterpret_cast<const int32_t*>(xu + m * K);
  const int64_t row = K / 4;  // int32 words per row of x
  for (int64_t q = 0; q < kq; ++q) {
    const int8_t* wq = wb + q * 256;
    const __m512i w0 = _mm512_loadu_si512(wq), w1 = _mm512_loadu_si512(wq + 64);
    const __m512i w2 = _mm512_loadu_si512(wq + 128), w3 = _mm512_loadu_si512(wq + 192);
    PF_ROW(0) PF_ROW(1) PF_ROW(2) PF_ROW(3) PF_ROW(4) PF_ROW(5)
  }
  PF_OUT(0) PF_OUT(1) PF_OUT(2) PF_OUT(3) PF_OUT(4) PF_OUT(5)
}

template <typename T>
void gemm(const uint8_t* xu, const float* xs, int64_t M, int64_t K, const int8_t* packed,
          const int32_t* comp, const float* ws, int64_t N, T* y) {
  const int64_t groups = (N + 63) / 64;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g * kMaxBlocks;
      int64_t m = 0;
      for (; m + kMaxRows <= M; m += kMaxRows)
        micro_kernel<kMaxRows>(xu, xs, m, K, packed, comp, ws, b, N, y);
      switch (M - m) {
        case 5: micro_kernel<5>(xu, xs, m, K, packed, comp, ws, b, N, y); break;
        case 4: micro_kernel<4>(xu, xs, m, K, packed, comp, ws, b, N, y); break;
        case 3: micro_kernel<3>(xu, xs, m, K, packed, comp, ws, b, N, y); break;
        case 2: micro_kernel<2>(xu, xs, m, K, packed, comp, ws, b, N, y); break;
        case 1: micro_kernel<1>(xu, xs, m, K, packed, comp, ws, b, N, y); break;
        default: break;
      }
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp,
                       const at::Tensor& w_scale, int64_t N) {
  TORCH_CHECK(x.dim() == 2, "int8_linear: x must be (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int8_linear: x must be float32 or bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3, "int8_linear: packed weight");
  TORCH_CHECK(comp.scalar_type() == at::kInt && w_scale.scalar_type() == at::kFloat,
              "int8_linear: comp int32, w_scale float32");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  TORCH_CHECK(packed.size(1) * 4 == K && packed.size(0) == (N + 63) / 64,
              "int8_linear: the packed weight does not fit x");
  auto xu = at::empty({M, K}, x.options().dtype(at::kByte));
  auto xs = at::empty({M}, x.options().dtype(at::kFloat));
  auto y = at::empty({M, N}, x.options());
  const int8_t* pw = packed.data_ptr<int8_t>();
  const int32_t* pc = comp.data_ptr<int32_t>();
  const float* ps = w_scale.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    quantize_rows(xc.data_ptr<float>(), M, K, xu.data_ptr<uint8_t>(), xs.data_ptr<float>());
    gemm(xu.data_ptr<uint8_t>(), xs.data_ptr<float>(), M, K, pw, pc, ps, N, y.data_ptr<float>());
  } else {
    auto xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    quantize_rows(xb, M, K, xu.data_ptr<uint8_t>(), xs.data_ptr<float>());
    gemm(xu.data_ptr<uint8_t>(), xs.data_ptr<float>(), M, K, pw, pc, ps, N,
         reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefixflow, m) {
  m.def("int8_pack_weight(Tensor w) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor comp, Tensor w_scale, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefixflow, CPU, m) {
  m.impl("int8_pack_weight", &int8_pack_weight);
  m.impl("int8_linear", &int8_linear);
}

#endif  // __AVX512VNNI__ && __AVX512BW__
