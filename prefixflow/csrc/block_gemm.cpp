// 4- or 8-bit weights (groups of 32 along K, w = (q - c) s + z) by activations in 8-bit
// blocks of 32, on AVX-512 VNNI, the way llama.cpp multiplies its Q4 and Q8 tensors (by
// Q8 blocks of activations):
//
//   block_linear   x (M, K) -> y (M, N), in x's dtype; bits = 4 or 8
//
// Each row's blocks of 32 values are quantized on their own (xq = round(x / a_b), a_b =
// max |x| / 127 over the block), so an outlier costs only its block. With w = (q - c) s + z
// and x = a xq over a block,
//   sum_k x w = a (s sum_k q xq + (z - c s) sum_k xq),
// so the weights stay unsigned codes (0..15, or 0..255: int8 + 128): vpdpbusd multiplies
// them (unsigned) by xq (signed) directly, 64 products per instruction, and the block's
// integer sum is scaled once per block. The zeros enter through sum_k xq, computed with
// the quantization; the caller passes z - c s. Every float step rounds as the PyTorch
// reference (model/quant/block_layout.py) does, in its order, so the two agree bit for bit.
//
// Weight layout (model/quant/block_layout.py packs it): channels in groups of 32 (past N:
// zero); for each k-step (4 consecutive k) a group holds two zmm of 16 channels x 4 k.
// 4-bit codes: 128 bytes per pair of steps, the first step's code in the low nibble and
// the second's in the high; 8-bit codes: 128 bytes per step. A group's codes are
// contiguous, so a thread streams them (groups of 64 read by halves were read at half the
// speed: the prefetcher fetched the other half too). Scales and z - c s are float32,
// (groups, K / 32, 32).

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

constexpr int64_t kBlock = 32;

// x (M, K) -> codes (M, K) int8, block scales (M, K / 32) and block sums of the codes.
template <typename T>
void quantize_blocks(const T* x, int64_t M, int64_t K, int8_t* xq, float* xs, int32_t* xsum) {
  const int64_t G = K / kBlock;
  at::parallel_for(0, M * G, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / G, g = i % G;
      const T* src = x + m * K + g * kBlock;
      const __m512 v[2] = {pf::load16(src), pf::load16(src + 16)};
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
      const float a = std::max(amax / 127.f, 1e-12f);
      const __m512 va = _mm512_set1_ps(a);
      __m512i sum = _mm512_setzero_si512();
      for (int h = 0; h < 2; ++h) {
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v[h], va), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i qi = _mm512_cvtps_epi32(q);
        sum = _mm512_add_epi32(sum, qi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + g * kBlock + 16 * h), _mm512_cvtepi32_epi8(qi));
      }
      xs[i] = a;
      xsum[i] = _mm512_reduce_add_epi32(sum);
    }
  });
}

// Sums of row r over NB blocks of 16 channels: int32 within a k-group, float32 across
// groups. Named registers (GCC spills arrays of them); blocks j >= NB and rows r >= MR are
// compiled out.
#define PF4_J(j, stmt) \
  if constexpr (NB > j) { stmt; }
#define PF4_DECL(r)                                                                  \
  __m512 f##r##0 = _mm512_setzero_ps(), f##r##1 = _mm512_setzero_ps(),               \
         f##r##2 = _mm512_setzero_ps(), f##r##3 = _mm512_setzero_ps();               \
  __m512i i##r##0, i##r##1, i##r##2, i##r##3;
#define PF4_ZERO(r)                                                                  \
  if constexpr (MR > r) {                                                            \
    i##r##0 = _mm512_setzero_si512(); i##r##1 = _mm512_setzero_si512();              \
    i##r##2 = _mm512_setzero_si512(); i##r##3 = _mm512_setzero_si512();              \
  }
#define PF4_DOT1(r, j) \
  i##r##j = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(i##r##j, lo##j, e), hi##j, o)
#define PF4_DOT(r)                                                                   \
  if constexpr (MR > r) {                                                            \
    const __m512i e = _mm512_set1_epi32(xr[r * row + q]);                            \
    const __m512i o = _mm512_set1_epi32(xr[r * row + q + 1]);                        \
    PF4_J(0, PF4_DOT1(r, 0)) PF4_J(1, PF4_DOT1(r, 1))                                \
    PF4_J(2, PF4_DOT1(r, 2)) PF4_J(3, PF4_DOT1(r, 3))                                \
  }
// a multiply and an add, each rounded, in the reference's order (no fused multiply-add;
// the build turns contraction off), so kernel and reference agree bit for bit
#define PF4_SCALE1(r, j)                                                             \
  f##r##j = _mm512_add_ps(f##r##j, _mm512_mul_ps(_mm512_cvtepi32_ps(i##r##j),        \
                                                 _mm512_mul_ps(s##j, a)));           \
  f##r##j = _mm512_add_ps(f##r##j, _mm512_mul_ps(zz##j, az))
#define PF4_SCALE(r)                                                                 \
  if constexpr (MR > r) {                                                            \
    const __m512 a = _mm512_set1_ps(xs[(m + r) * G + g]);                            \
    const __m512 az = _mm512_set1_ps(xs[(m + r) * G + g] * xsum[(m + r) * G + g]);   \
    PF4_J(0, PF4_SCALE1(r, 0)) PF4_J(1, PF4_SCALE1(r, 1))                            \
    PF4_J(2, PF4_SCALE1(r, 2)) PF4_J(3, PF4_SCALE1(r, 3))                            \
  }
#define PF4_OUT(r)                                                                   \
  if constexpr (MR > r) {                                                            \
    const __m512 outs[4] = {f##r##0, f##r##1, f##r##2, f##r##3};                     \
    for (int j = 0; j < NB; ++j) {                                                   \
      const int64_t n = c0 + 16 * j, left = N - n;                                   \
      if (left <= 0) break;                                                          \
      const __mmask16 mask = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);    \
      pf::store16(y + (m + r) * N + n, outs[j], mask);                                   \
    }                                                                                \
  }
// the codes of two k-steps: lo (the first) and hi (the second), 16 channels x 4 k each
#define PF4_UNPACK(j)                                                                \
  __m512i lo##j = _mm512_setzero_si512(), hi##j = _mm512_setzero_si512();            \
  if constexpr (NB > j) {                                                            \
    if constexpr (kBits == 4) {                                                      \
      const __m512i v = _mm512_loadu_si512((j < 2 ? w : w2) + 64 * (j % 2));         \
      lo##j = _mm512_and_si512(v, low);                                              \
      hi##j = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);                        \
    } else {                                                                         \
      lo##j = _mm512_loadu_si512((j < 2 ? w : w2) + 64 * (j % 2));                   \
      hi##j = _mm512_loadu_si512((j < 2 ? w : w2) + 128 + 64 * (j % 2));             \
    }                                                                                \
  }
#define PF4_LOAD_SCALE(j)                                                            \
  const __m512 s##j =                                                                \
      NB > j ? _mm512_loadu_ps((j < 2 ? sg : sg2) + g * 32 + 16 * (j % 2)) : _mm512_setzero_ps(); \
  const __m512 zz##j =                                                               \
      NB > j ? _mm512_loadu_ps((j < 2 ? zg : zg2) + g * 32 + 16 * (j % 2)) : _mm512_setzero_ps();

// MR rows from m by NB blocks of 16 channels from group grp: 2 (one group; up to 4 rows,
// so each unpacked code serves 4 rows, and the group's codes, 32 channels x K / 2 or K
// bytes, stay in L1 across the passes over the rows) or 4 (groups grp and grp + 1, two
// streams; 1 or 2 rows, where 2 blocks left too few sums in flight).
template <int kBits, int MR, int NB, typename T>
void micro_kernel(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t m, int64_t K,
                  const uint8_t* packed, const float* scales, const float* zeros, int64_t grp,
                  int64_t N, T* y) {
  static_assert(MR * NB <= 8, "sums must fit the registers");
  const int64_t G = K / kBlock, row = K / 4;
  const int64_t c0 = grp * 32;
  const int32_t* xr = reinterpret_cast<const int32_t*>(xq + m * K);
  // bytes of a group per pair of k-steps
  constexpr int64_t kPair = kBits == 4 ? 128 : 256;
  const uint8_t* wg = packed + grp * (K / 8) * kPair;
  const float* sg = scales + grp * G * 32;
  const float* zg = zeros + grp * G * 32;
  const float* sg2 = sg + G * 32;  // the next group's (NB = 4)
  const float* zg2 = zg + G * 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  PF4_DECL(0) PF4_DECL(1) PF4_DECL(2) PF4_DECL(3)
  for (int64_t g = 0; g < G; ++g) {
    PF4_ZERO(0) PF4_ZERO(1) PF4_ZERO(2) PF4_ZERO(3)
    for (int64_t p = 0; p < 4; ++p) {  // pairs of k-steps: 8 k each
      const int64_t q = g * 8 + 2 * p;  // the first k-step (4 k) of the pair
      const uint8_t* w = wg + (q / 2) * kPair;
      const uint8_t* w2 = w + (K / 8) * kPair;  // the next group's (NB = 4)
      PF4_UNPACK(0) PF4_UNPACK(1) PF4_UNPACK(2) PF4_UNPACK(3)
      PF4_DOT(0) PF4_DOT(1) PF4_DOT(2) PF4_DOT(3)
    }
    PF4_LOAD_SCALE(0) PF4_LOAD_SCALE(1) PF4_LOAD_SCALE(2) PF4_LOAD_SCALE(3)
    PF4_SCALE(0) PF4_SCALE(1) PF4_SCALE(2) PF4_SCALE(3)
  }
  PF4_OUT(0) PF4_OUT(1) PF4_OUT(2) PF4_OUT(3)
}

template <int kBits, typename T>
void gemm(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t M, int64_t K,
          const uint8_t* pw, const float* sc, const float* ze, int64_t N, T* y) {
  const int64_t groups = (N + 31) / 32;
  if (M <= 2) {  // two groups at a time, where there are two
    at::parallel_for(0, (groups + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t pair = p0; pair < p1; ++pair) {
        const int64_t grp = 2 * pair;
        const bool both = grp + 1 < groups;
        if (M == 2 && both) micro_kernel<kBits, 2, 4>(xq, xs, xsum, 0, K, pw, sc, ze, grp, N, y);
        else if (M == 2) micro_kernel<kBits, 2, 2>(xq, xs, xsum, 0, K, pw, sc, ze, grp, N, y);
        else if (both) micro_kernel<kBits, 1, 4>(xq, xs, xsum, 0, K, pw, sc, ze, grp, N, y);
        else micro_kernel<kBits, 1, 2>(xq, xs, xsum, 0, K, pw, sc, ze, grp, N, y);
      }
    });
    return;
  }
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t grp = g0; grp < g1; ++grp) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) micro_kernel<kBits, 4, 2>(xq, xs, xsum, m, K, pw, sc, ze, grp, N, y);
      switch (M - m) {
        case 3: micro_kernel<kBits, 3, 2>(xq, xs, xsum, m, K, pw, sc, ze, grp, N, y); break;
        case 2: micro_kernel<kBits, 2, 2>(xq, xs, xsum, m, K, pw, sc, ze, grp, N, y); break;
        case 1: micro_kernel<kBits, 1, 2>(xq, xs, xsum, m, K, pw, sc, ze, grp, N, y); break;
        default: break;
      }
    }
  });
}

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t N, int64_t bits) {
  TORCH_CHECK(x.dim() == 2, "block_linear: x must be (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "block_linear: x must be float32 or bfloat16");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), G = K / kBlock;
  const int64_t groups = (N + 31) / 32;
  TORCH_CHECK(K % kBlock == 0, "block_linear: K must be a multiple of 32");
  TORCH_CHECK(bits == 4 || bits == 8, "block_linear: bits must be 4 or 8");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == groups * (K / 8) * 128 * (bits / 4),
              "block_linear: the packed weight does not fit x");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == groups * G * 32 &&
                  zeros.scalar_type() == at::kFloat && zeros.numel() == groups * G * 32,
              "block_linear: scales and zeros must be float32 (groups, K / 32, 32)");
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xs = at::empty({M, G}, x.options().dtype(at::kFloat));
  auto xsum = at::empty({M, G}, x.options().dtype(at::kInt));
  auto y = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    quantize_blocks(xc.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
                    xsum.data_ptr<int32_t>());
  } else {
    quantize_blocks(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K,
                    xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xsum.data_ptr<int32_t>());
  }
  const int8_t* pq = xq.data_ptr<int8_t>();
  const float* ps = xs.data_ptr<float>();
  const int32_t* pm = xsum.data_ptr<int32_t>();
  const uint8_t* pw = packed.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* ze = zeros.data_ptr<float>();
  auto* yb = reinterpret_cast<uint16_t*>(x.scalar_type() == at::kFloat ? nullptr : y.data_ptr<at::BFloat16>());
  if (x.scalar_type() == at::kFloat) {
    if (bits == 4) gemm<4>(pq, ps, pm, M, K, pw, sc, ze, N, y.data_ptr<float>());
    else gemm<8>(pq, ps, pm, M, K, pw, sc, ze, N, y.data_ptr<float>());
  } else {
    if (bits == 4) gemm<4>(pq, ps, pm, M, K, pw, sc, ze, N, yb);
    else gemm<8>(pq, ps, pm, M, K, pw, sc, ze, N, yb);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefixflow, m) {
  m.def("block_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int N, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefixflow, CPU, m) { m.impl("block_linear", &block_linear); }

#endif  // __AVX512VNNI__ && __AVX512BW__
