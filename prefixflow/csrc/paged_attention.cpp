// Paged attention on the CPU that reads KV pages in place (no gather copy).
//
// One call attends a list of items. An item is a set of query rows (token indices into q)
// and a run of KV pages; row i of an item may see keys [0, min(n_keys, causal_base + i + 1)).
// That one shape covers a decode (one row, every key), a prompt chunk (causal over its cached
// context) and a shared-prefix part (the stacked rows of many sequences, every key). Each
// row gets its attention output (float32) and log-sum-exp, ready for the exact merge of
// shared-prefix attention; or (accumulate) merges them into what out and lse already hold,
// so a shared part folds into its rows' results where it is computed.
//
// A call may take a sliding window (window > 0): row i then sees keys from
// max(0, causal_base + i + 1 - window), i.e. itself and the window - 1 keys before it, as
// transformers' sliding-window causal mask (keys numbered from the item's first page, so
// a table trimmed to its window keeps causal_base relative to its trimmed start). Units
// start at the page of their first row's first key, so pages before every row's window
// are never read. A call may also cap its scores (softcap > 0): each scaled score s
// becomes softcap * tanh(s / softcap), in float32, before the mask and the softmax
// (Gemma 2). Both are decided per unit or per block of keys, never per score.
//
// Layout (prefixflow/attention/kv_layout.py): a layer's cache is (2, pages, H_kv,
// page_size * D). With w = 4 / element size (2 for bfloat16, 1 for float32), a page's keys
// for one head are (D / w, page_size, w) and its values (page_size / w, D, w). So the 16
// keys of one page-aligned group, for w dimensions, are one vector; and w keys' values of 16
// dimensions are one vector. Scores of 16 keys come out as one vector without any
// horizontal sum, and values need no transposing: in bfloat16 both are exactly the operands
// of the CPU's bfloat16 dot product (avx512_bf16), which takes pairs and sums in float32.
//
// Work is split into units of (item, KV heads, block of query vectors, run of keys), where a
// query vector is one (row, query head) pair. The G query heads of a KV head share its keys,
// so a unit loads each key once for up to 6 query vectors. A unit with few rows (a decode)
// takes every KV head, so it reads each page once, whole. When there are too few units to
// keep every thread busy (one long context), the keys are split into runs whose partial
// results are merged by log-sum-exp. Softmax and accumulation are float32.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define PF_AVX512 1
#else
#define PF_AVX512 0
#endif

#include "cpu_math.h"

namespace {

#if defined(__AVX512F__)
using pf::exp16;
using pf::tanh16;
#endif

constexpr int kMaxQV = 8;     // query vectors per KV head in one unit, at most
constexpr int kMaxHeads = 8;  // KV heads one unit takes together, at most
// Blocks of query vectors one unit takes, at most: a block is one KV head's (up to) kMaxQV
// vectors, so a unit holds either several heads' vectors of a few rows (a decode) or many
// blocks of one head (a long chunk, a shared part). Every block of a unit reads a group of
// 16 keys while it is in L1: the keys come from memory once per unit, not once per block.
constexpr int kMaxBlocks = 8;
constexpr int kMaxD = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();


template <typename T>
inline float to_float(T x);
template <>
inline float to_float<float>(float x) { return x; }
template <>
inline float to_float<uint16_t>(uint16_t x) { return pf::bf2f(x); }

struct Item {
  int32_t row_off, n_rows, page_off, n_keys, causal_base;
};

// A unit: for KV heads [h0, h0 + nh), query vectors [qv0, qv0 + nqv) (numbered row * G + g)
// of `item`, against keys [k0, k1). Its results are numbered b * nqv + j for its blocks b.
struct Unit {
  int item, h0, nh, qv0, nqv, k0, k1;
  int nsub;  // blocks of nqv vectors of head h0 (nh = 1), or 1: the unit's nh heads are its blocks
  int64_t part;  // where its partial results go (D + 2 floats a vector), or -1: final
};

// A unit's results per query vector: unnormalised output, running max, running sum.
struct Result {
  explicit Result(int D)
      : D(D), o(static_cast<size_t>(kMaxBlocks) * kMaxQV * D), m(kMaxBlocks * kMaxQV), l(kMaxBlocks * kMaxQV) {}
  int D;
  std::vector<float> o, m, l;
  float* out(int v) { return o.data() + static_cast<int64_t>(v) * D; }
};

struct Ctx {
  const void* q;
  const void* k;  // kv[0]
  const void* v;  // kv[1]
  const int32_t* rows;
  const int32_t* pages;
  int H, H_kv, G, D, bs, w;
  int64_t q_tok_stride, q_head_stride;  // in elements
  int64_t page_stride, head_stride;
  float scale;
  int window;     // 0: none
  float softcap;  // 0: none
  bool fast_exp;  // bfloat16: softmax_block_bf16 where it applies
  // Element offsets of key / value (token t of a page, dimension d) within a head's block.
  int64_t k_at(int t, int d) const { return (static_cast<int64_t>(d / w) * bs + t) * w + d % w; }
  int64_t v_at(int t, int d) const { return (static_cast<int64_t>(t / w) * D + d) * w + t % w; }
  int64_t block(int page, int head) const { return page * page_stride + head * head_stride; }
};

inline int row_limit(const Item& it, int row) { return std::min(it.n_keys, it.causal_base + row + 1); }

// The first key a row sees: a query sees itself and the window - 1 positions before it.
inline int row_first(const Ctx& c, const Item& it, int row) {
  return c.window > 0 ? std::max(0, it.causal_base + row + 1 - c.window) : 0;
}

template <typename T>
inline const T* q_row(const Ctx& c, const Item& it, int head, int qv) {
  const int r = qv / c.G, g = qv % c.G;
  const int tok = c.rows[it.row_off + r];
  return static_cast<const T*>(c.q) + tok * c.q_tok_stride + (head * c.G + g) * c.q_head_stride;
}

// ---------------------------------------------------------------- generic path
template <typename T>
void unit_generic(const Ctx& c, const Item& it, const Unit& u, Result& res) {
  const T* kc = static_cast<const T*>(c.k);
  const T* vc = static_cast<const T*>(c.v);
  const int D = c.D;
  std::vector<float> qf(D);
  for (int hi = 0; hi < u.nh; ++hi) {
    const int h = u.h0 + hi;
    for (int j = 0; j < u.nqv; ++j) {
      const int v = hi * u.nqv + j;
      const T* src = q_row<T>(c, it, h, u.qv0 + j);
      for (int d = 0; d < D; ++d) qf[d] = to_float<T>(src[d]) * c.scale;
      const int limit = row_limit(it, (u.qv0 + j) / c.G);
      const int first = std::max(u.k0, row_first(c, it, (u.qv0 + j) / c.G));
      float* o = res.out(v);
      float m = kNegInf, l = 0.f;
      for (int d = 0; d < D; ++d) o[d] = 0.f;
      for (int key = first; key < std::min(u.k1, limit); ++key) {
        const int64_t blk = c.block(c.pages[it.page_off + key / c.bs], h);
        const int t = key % c.bs;
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += qf[d] * to_float<T>(kc[blk + c.k_at(t, d)]);
        if (c.softcap > 0.f) s = c.softcap * std::tanh(s / c.softcap);
        const float mx = std::max(m, s);
        const float alpha = m == kNegInf ? 0.f : std::exp(m - mx);
        const float p = std::exp(s - mx);
        for (int d = 0; d < D; ++d) o[d] = o[d] * alpha + p * to_float<T>(vc[blk + c.v_at(t, d)]);
        l = l * alpha + p;
        m = mx;
      }
      res.m[v] = m;
      res.l[v] = l;
    }
  }
}

#if PF_AVX512
// ---------------------------------------------------------------- AVX-512 path


// acc += (pair a0, a1 in every lane) . (lanes of b as bfloat16 pairs), in float32.
inline __m512 dot2(__m512 acc, uint32_t a, __m512i b) {
#if defined(__AVX512BF16__)
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a)), (__m512bh)b);
#else
  // Without bfloat16 dot products: widen each half of the pair (a bfloat16 is the top
  // half of a float32).
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
  const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(-65536)));
  uint32_t a_lo = a << 16, a_hi = a & 0xFFFF0000u;
  float f_lo, f_hi;
  std::memcpy(&f_lo, &a_lo, 4);
  std::memcpy(&f_hi, &a_hi, 4);
  acc = _mm512_fmadd_ps(_mm512_set1_ps(f_lo), lo, acc);
  return _mm512_fmadd_ps(_mm512_set1_ps(f_hi), hi, acc);
#endif
}

// Per (head, vector) state of a unit, kept in memory between the heads of a block.
template <int DV>
struct State {
  __m512 acc[kMaxBlocks][kMaxQV][DV];
  float m[kMaxBlocks][kMaxQV];
  __m512 l[kMaxBlocks][kMaxQV];  // running sums, lane-wise
};

// Keys are taken in blocks of up to 64 (groups of 16 within pages), so the horizontal max
// and the rescaling of the outputs happen once per block.
constexpr int kBlock = 64;

// The online-softmax step of one query vector over a block: scores s[0..3] (scaled), of
// which the first `vis` count. Leaves the block's probabilities in p (0 where not visible),
// rescaling acc and the running sum when the max moves.
// The running max m after a block's first `vis` scores; when it moves, acc and the running
// sum are rescaled by rescale(old m - new m).
template <int DV, typename Rescale>
inline void track_max(const __m512* s, int vis, __m512* acc, float& m, __m512& l, Rescale rescale) {
  __m512 mv = _mm512_set1_ps(kNegInf);
  for (int b = 0; b < kBlock / 16; ++b) {
    const int vb = std::max(0, std::min(16, vis - 16 * b));
    mv = _mm512_mask_max_ps(mv, static_cast<__mmask16>((1u << vb) - 1), mv, s[b]);
  }
  if (vis > 0) {
    const float mx = std::max(m, _mm512_reduce_max_ps(mv));
    if (mx != m) {
      const __m512 av = _mm512_set1_ps(m == kNegInf ? 0.f : rescale(m - mx));
      for (int d = 0; d < DV; ++d) acc[d] = _mm512_mul_ps(acc[d], av);
      l = _mm512_mul_ps(l, av);
      m = mx;
    }
  }
}

template <int DV>
inline void softmax_block(__m512* s, int vis, __m512* p, __m512* acc, float& m, __m512& l) {
  track_max<DV>(s, vis, acc, m, l, [](float x) { return std::exp(x); });
  const __m512 mxv = _mm512_set1_ps(m);
  for (int b = 0; b < kBlock / 16; ++b) {
    const int vb = std::max(0, std::min(16, vis - 16 * b));
    p[b] = vb ? _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << vb) - 1), exp16(_mm512_sub_ps(s[b], mxv)))
              : _mm512_setzero_ps();
  }
}

// 2^t on 16 floats to about 3e-6 relative: 2^n by scalef, 2^f (|f| <= 1/2) by a degree-4
// polynomial (least squares on Chebyshev nodes). Enough where the result is rounded to
// bfloat16 (2^-9 relative) before it is used, as a bfloat16 call's probabilities are.
inline __m512 exp2_bf16(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(0.009600409306585789f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05591697618365288f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24023719131946564f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931219696998596f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// softmax_block on unscaled scores, for bfloat16 calls without window or cap: m is kept
// unscaled too, and one fused multiply-add per vector takes a score to the exponent
// (scale * log2(e) * (s - m)) that exp2_bf16 raises 2 to. It spares the scaling of the
// scores and half of exp16's work, about a quarter of the softmax's.
template <int DV>
inline void softmax_block_bf16(__m512* s, int vis, __m512* p, __m512* acc, float& m, __m512& l, float c2) {
  track_max<DV>(s, vis, acc, m, l, [c2](float x) { return std::exp2(x * c2); });
  const __m512 c2v = _mm512_set1_ps(c2);
  const __m512 off = _mm512_set1_ps(m == kNegInf ? 0.f : -m * c2);
  for (int b = 0; b < kBlock / 16; ++b) {
    const int vb = std::max(0, std::min(16, vis - 16 * b));
    p[b] = vb ? _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << vb) - 1), exp2_bf16(_mm512_fmadd_ps(s[b], c2v, off)))
              : _mm512_setzero_ps();
  }
}

// Lanes [lo, vis) of group b of a block, as a mask.
inline __mmask16 window_lanes(int lo, int vis, int b) {
  const int vb = std::max(0, std::min(16, vis - 16 * b));
  const int lb = std::max(0, std::min(16, lo - 16 * b));
  return static_cast<__mmask16>(((1u << vb) - 1) & ~((1u << lb) - 1));
}

// softmax_block for a windowed row: the scores in [lo, vis) count. A copy, not a
// generalisation: the plain path keeps the code (and register allocation) it measured
// best with; sharing one template cost a prompt chunk 6%.
template <int DV>
inline void softmax_block_window(__m512* s, int lo, int vis, __m512* p, __m512* acc, float& m, __m512& l) {
  __m512 mv = _mm512_set1_ps(kNegInf);
  for (int b = 0; b < kBlock / 16; ++b) mv = _mm512_mask_max_ps(mv, window_lanes(lo, vis, b), mv, s[b]);
  if (vis > lo) {
    const float mx = std::max(m, _mm512_reduce_max_ps(mv));
    if (mx != m) {
      const __m512 av = _mm512_set1_ps(m == kNegInf ? 0.f : std::exp(m - mx));
      for (int d = 0; d < DV; ++d) acc[d] = _mm512_mul_ps(acc[d], av);
      l = _mm512_mul_ps(l, av);
      m = mx;
    }
  }
  const __m512 mxv = _mm512_set1_ps(m);
  for (int b = 0; b < kBlock / 16; ++b) {
    const __mmask16 mk = window_lanes(lo, vis, b);
    p[b] = mk ? _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(s[b], mxv))) : _mm512_setzero_ps();
  }
}

// s = softcap * tanh(s / softcap) on a block's scores.
inline void softcap_block(__m512* s, float softcap) {
  const __m512 cap = _mm512_set1_ps(softcap);
  for (int b = 0; b < kBlock / 16; ++b) s[b] = _mm512_mul_ps(cap, tanh16(_mm512_div_ps(s[b], cap)));
}

// One unit, T = float (w = 1) or bfloat16 (w = 2), D = 16 * DV, page_size a multiple of 16;
// kExt: the call has a sliding window or a soft cap (chosen once per unit, so plain calls
// run the very code they ran before either existed); kFast: softmax_block_bf16 (bfloat16,
// neither window nor cap).
template <typename T, int DV, int NQV, bool kExt, bool kFast = false>
void unit_avx512(const Ctx& c, const Item& it, const Unit& u, Result& res) {
  constexpr int D = 16 * DV;
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  constexpr int W = kBf16 ? 2 : 1;
  constexpr int NG = kBlock / 16;
  const T* kc = static_cast<const T*>(c.k);
  const T* vc = static_cast<const T*>(c.v);
  // q: float32, scaled (w = 1); or the raw bfloat16 pairs as 32-bit words (w = 2).
  alignas(64) float qf[kMaxBlocks][NQV][D];
  alignas(64) uint32_t qp[kMaxBlocks][NQV][D / 2];
  int limit[kMaxBlocks][NQV];
  int first[kMaxBlocks][NQV];  // kExt: each vector's first visible key
  int64_t hoff[kMaxBlocks];    // each block's KV head, as an offset from head h0's block
  State<DV> st;
  const int nb = u.nh * u.nsub;  // one of the two is 1
  for (int hi = 0; hi < nb; ++hi) {
    const int head = u.h0 + hi / u.nsub, qv0 = u.qv0 + (hi % u.nsub) * NQV;
    hoff[hi] = static_cast<int64_t>(hi / u.nsub) * c.head_stride;
    for (int j = 0; j < NQV; ++j) {
      limit[hi][j] = row_limit(it, (qv0 + j) / c.G);
      if constexpr (kExt) first[hi][j] = row_first(c, it, (qv0 + j) / c.G);
      const T* src = q_row<T>(c, it, head, qv0 + j);
      if constexpr (kBf16) {
        std::memcpy(qp[hi][j], src, sizeof(uint16_t) * D);
      } else {
        for (int d = 0; d < D; ++d) qf[hi][j][d] = src[d] * c.scale;
      }
      for (int d = 0; d < DV; ++d) st.acc[hi][j][d] = _mm512_setzero_ps();
      st.m[hi][j] = kNegInf;
      st.l[hi][j] = _mm512_setzero_ps();
    }
  }
  const __m512 scale = _mm512_set1_ps(c.scale);
  const float c2 = c.scale * 1.44269504088896341f;  // kFast: scale * log2(e)
  __m512 s[kMaxBlocks][NQV][NG];                   // a block's scores
  alignas(64) float pf[kMaxBlocks][NQV][kBlock];   // its probabilities (w = 1)
  alignas(64) uint32_t pb[kMaxBlocks][NQV][kBlock / 2];  // ... as bfloat16 pairs (w = 2)
  int64_t gblk[NG];  // each group of 16 keys: its page's first element, ...
  int gt0[NG];       // ... and its first key's offset in the page
  for (int kb = u.k0; kb < u.k1; kb += kBlock) {
    const int cnt = std::min(kBlock, u.k1 - kb);
    const int ngrp = (cnt + 15) / 16;
    for (int g = 0; g < ngrp; ++g) {
      const int key = kb + 16 * g;
      gblk[g] = static_cast<int64_t>(c.pages[it.page_off + key / c.bs]) * c.page_stride +
                static_cast<int64_t>(u.h0) * c.head_stride;
      gt0[g] = key % c.bs;
    }
    // Scores, reading each page's keys for the unit's heads in memory order (the hardware
    // prefetcher then streams them; prefetching by hand measured slower).
    for (int g = 0; g < NG; ++g) {
      for (int hi = 0; hi < nb; ++hi) {
        __m512 sg[NQV];
        for (int j = 0; j < NQV; ++j) sg[j] = _mm512_setzero_ps();
        if (g < ngrp) {
          const T* kblk = kc + gblk[g] + hoff[hi];
          const int t0 = gt0[g];
          if constexpr (kBf16) {
            for (int i = 0; i < D / 2; ++i) {
              const __m512i kv = _mm512_loadu_si512(kblk + (static_cast<int64_t>(i) * c.bs + t0) * 2);
              for (int j = 0; j < NQV; ++j) sg[j] = dot2(sg[j], qp[hi][j][i], kv);
            }
            if constexpr (!kFast) {
              for (int j = 0; j < NQV; ++j) sg[j] = _mm512_mul_ps(sg[j], scale);
            }
          } else {
            for (int d = 0; d < D; ++d) {
              const __m512 kv = _mm512_loadu_ps(kblk + static_cast<int64_t>(d) * c.bs + t0);
              for (int j = 0; j < NQV; ++j) sg[j] = _mm512_fmadd_ps(_mm512_set1_ps(qf[hi][j][d]), kv, sg[j]);
            }
          }
        }
        for (int j = 0; j < NQV; ++j) s[hi][j][g] = sg[j];
      }
    }
    // Softmax over the block, per query vector.
    for (int hi = 0; hi < nb; ++hi) {
      for (int j = 0; j < NQV; ++j) {
        const int vis = std::max(0, std::min(cnt, limit[hi][j] - kb));
        __m512 p[NG];
        if constexpr (kExt) {
          if (c.softcap > 0.f) softcap_block(s[hi][j], c.softcap);
          const int lo = std::max(0, first[hi][j] - kb);
          softmax_block_window<DV>(s[hi][j], lo, vis, p, st.acc[hi][j], st.m[hi][j], st.l[hi][j]);
        } else if constexpr (kFast) {
          softmax_block_bf16<DV>(s[hi][j], vis, p, st.acc[hi][j], st.m[hi][j], st.l[hi][j], c2);
        } else {
          softmax_block<DV>(s[hi][j], vis, p, st.acc[hi][j], st.m[hi][j], st.l[hi][j]);
        }
        if constexpr (kBf16) {
          for (int b = 0; b < NG; b += 2) {
            // 32 probabilities as bfloat16 pairs, in key order; the rounded values are the
            // ones multiplied in, so they are the ones summed.
            const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(p[b + 1], p[b]);
            _mm512_store_si512(reinterpret_cast<__m512i*>(pb[hi][j] + 8 * b), w);
            st.l[hi][j] = _mm512_add_ps(st.l[hi][j], _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
            st.l[hi][j] = _mm512_add_ps(st.l[hi][j], _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(-65536))));
          }
        } else {
          for (int b = 0; b < NG; ++b) {
            _mm512_store_ps(pf[hi][j] + 16 * b, p[b]);
            st.l[hi][j] = _mm512_add_ps(st.l[hi][j], p[b]);
          }
        }
      }
    }
    // Values, again in memory order.
    for (int g = 0; g < ngrp; ++g) {
      const int t0 = gt0[g];
      const int n = std::min(16, cnt - 16 * g);
      for (int hi = 0; hi < nb; ++hi) {
        const T* vblk = vc + gblk[g] + hoff[hi];
        __m512 acc[NQV][DV];
        for (int j = 0; j < NQV; ++j)
          for (int d = 0; d < DV; ++d) acc[j][d] = st.acc[hi][j][d];
        for (int t = 0; t < n; t += W) {
          // keys t0 + t (and t0 + t + 1): one vector per 16 dimensions
          const T* row = vblk + static_cast<int64_t>((t0 + t) / W) * D * W;
          __m512i vv[DV];
          for (int d = 0; d < DV; ++d) vv[d] = _mm512_loadu_si512(row + 16 * d * W);
          for (int j = 0; j < NQV; ++j) {
            if constexpr (kBf16) {
              const uint32_t pp = pb[hi][j][(16 * g + t) / 2];
              for (int d = 0; d < DV; ++d) acc[j][d] = dot2(acc[j][d], pp, vv[d]);
            } else {
              const __m512 pp = _mm512_set1_ps(pf[hi][j][16 * g + t]);
              for (int d = 0; d < DV; ++d) acc[j][d] = _mm512_fmadd_ps(pp, _mm512_castsi512_ps(vv[d]), acc[j][d]);
            }
          }
        }
        for (int j = 0; j < NQV; ++j)
          for (int d = 0; d < DV; ++d) st.acc[hi][j][d] = acc[j][d];
      }
    }
  }
  for (int hi = 0; hi < nb; ++hi) {
    for (int j = 0; j < NQV; ++j) {
      const int v = hi * NQV + j;
      for (int d = 0; d < DV; ++d) _mm512_storeu_ps(res.out(v) + 16 * d, st.acc[hi][j][d]);
      res.m[v] = kFast ? st.m[hi][j] * c.scale : st.m[hi][j];  // kFast kept it unscaled
      res.l[v] = _mm512_reduce_add_ps(st.l[hi][j]);
    }
  }
}

template <typename T, int DV, int N>
inline void dispatch_nqv(const Ctx& c, const Item& it, const Unit& u, Result& res) {
  if constexpr (N == 0) {
    unit_generic<T>(c, it, u, res);
  } else {
    if (u.nqv == N) {
      if (c.window > 0 || c.softcap > 0.f) return unit_avx512<T, DV, N, true>(c, it, u, res);
      if (std::is_same_v<T, uint16_t> && c.fast_exp) return unit_avx512<T, DV, N, false, true>(c, it, u, res);
      return unit_avx512<T, DV, N, false>(c, it, u, res);
    }
    dispatch_nqv<T, DV, N - 1>(c, it, u, res);
  }
}
#endif

// Whether the vector path applies: head sizes of 64, 128 or 256 (Gemma 3, Gemma 2), pages
// of whole groups of 16. The scalar path ran Gemma-3-1B's D = 256 prompts 15x slower.
inline bool vector_path(const Ctx& c) {
#if PF_AVX512
  return (c.D == 64 || c.D == 128 || c.D == 256) && c.bs % 16 == 0;
#else
  return false;
#endif
}

// Query vectors per KV head in a unit: as many as keep the outputs in registers.
inline int max_qv(const Ctx& c) {
  if (!vector_path(c)) return kMaxQV;
  return c.D == 64 ? 6 : c.D == 128 ? 3 : 1;  // D = 256: one vector's outputs fill 16 registers
}

template <typename T>
void attend(const Ctx& c, const Item& it, const Unit& u, Result& res) {
#if PF_AVX512
  if (vector_path(c)) {
    if (c.D == 64) return dispatch_nqv<T, 4, 6>(c, it, u, res);
    if (c.D == 256) return dispatch_nqv<T, 16, 1>(c, it, u, res);
    return dispatch_nqv<T, 8, 3>(c, it, u, res);
  }
#endif
  unit_generic<T>(c, it, u, res);
}

template <typename T>
void run(at::Tensor& out, at::Tensor& lse, const at::Tensor& q, const at::Tensor& kv,
         int64_t page_size, const std::vector<Item>& items, const int32_t* rows, const int32_t* pages,
         double scale, int64_t key_split, int64_t window, double softcap, int64_t sub_blocks,
         bool fast_exp, bool accumulate) {
  Ctx c;
  c.q = q.data_ptr();
  c.k = kv.data_ptr();
  c.v = static_cast<const T*>(kv.data_ptr()) + kv.stride(0);
  c.rows = rows;
  c.pages = pages;
  c.H = q.size(1);
  c.D = q.size(2);
  c.q_tok_stride = q.stride(0);
  c.q_head_stride = q.stride(1);
  c.bs = static_cast<int>(page_size);
  c.H_kv = kv.size(2);
  c.G = c.H / c.H_kv;
  c.w = std::is_same_v<T, uint16_t> ? 2 : 1;
  c.page_stride = kv.stride(1);
  c.head_stride = kv.stride(2);
  c.scale = static_cast<float>(scale);
  c.window = static_cast<int>(window);
  c.softcap = static_cast<float>(softcap);
  c.fast_exp = fast_exp;
  const int D = c.D, G = c.G;
  const int per_unit = max_qv(c);
  const int threads = at::get_num_threads();

  // An item whose query vectors fit one unit per head takes all heads at once (up to 8).
  auto heads_per_unit = [&](const Item& it) {
    return it.n_rows * G <= per_unit ? std::min(c.H_kv, kMaxHeads) : 1;
  };
  // An item's query vectors of one head, as units: (first vector, vectors a block, blocks).
  // Full blocks go kMaxBlocks (or sub_blocks) to a unit; the rest of the vectors in one.
  const int max_sub = vector_path(c) ? static_cast<int>(std::clamp<int64_t>(sub_blocks, 1, kMaxBlocks)) : 1;
  auto spans = [&](const Item& it, int nh_unit) {
    std::vector<std::array<int, 3>> out;
    const int total = it.n_rows * G;
    for (int qv0 = 0; qv0 < total;) {
      const int nqv = std::min(per_unit, total - qv0);
      const int nsub = nh_unit == 1 ? std::max(1, std::min(max_sub, (total - qv0) / per_unit)) : 1;
      out.push_back({qv0, nqv, nsub});
      qv0 += nqv * nsub;
    }
    return out;
  };
  // Units without key splits first, to see whether the threads have enough work.
  std::vector<std::vector<std::array<int, 3>>> item_spans(items.size());
  int64_t base_units = 0;
  int max_keys = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const int nh = heads_per_unit(it);
    item_spans[i] = spans(it, nh);
    base_units += static_cast<int64_t>((c.H_kv + nh - 1) / nh) * item_spans[i].size();
    // A windowed row reads at most its window, and a unit's rows a few pages more.
    const int span = c.window > 0 ? std::min(it.n_keys, c.window + it.n_rows + c.bs) : it.n_keys;
    max_keys = std::max(max_keys, span);
  }
  int chunk = max_keys;
  if (key_split > 0) {
    chunk = static_cast<int>(key_split);
  } else if (base_units > 0 && base_units < 4 * threads && max_keys > 512) {
    const int64_t want = (4 * threads + base_units - 1) / base_units;
    chunk = std::max<int>(256, static_cast<int>((max_keys + want - 1) / want));
  }
  // Runs start on page edges, so the vector path's groups of 16 keys stay within pages.
  chunk = std::max(c.bs, (chunk + c.bs - 1) / c.bs * c.bs);

  struct Group {
    int item, h0, nh, qv0, nqv, nsub, n_chunks;
    int64_t first_part, part_stride;
  };
  std::vector<Unit> units;
  std::vector<Group> groups;
  int64_t part_floats = 0;
  for (int i = 0; i < static_cast<int>(items.size()); ++i) {
    const Item& it = items[i];
    const int nh_unit = heads_per_unit(it);
    for (int h0 = 0; h0 < c.H_kv; h0 += nh_unit) {
      const int nh = std::min(nh_unit, c.H_kv - h0);
      for (const auto& [qv0, nqv, nsub] : item_spans[i]) {
        const int reach = std::max(0, row_limit(it, (qv0 + nqv * nsub - 1) / G));
        // From the page of the first row's first key: the page edge keeps the vector
        // path's groups of 16 keys within pages.
        const int lo = std::min(reach, row_first(c, it, qv0 / G) / c.bs * c.bs);
        const int n_chunks = std::max(1, (reach - lo + chunk - 1) / chunk);
        if (n_chunks == 1) {
          units.push_back({i, h0, nh, qv0, nqv, lo, reach, nsub, -1});
        } else {
          const int64_t stride = static_cast<int64_t>(nh) * nsub * nqv * (D + 2);
          groups.push_back({i, h0, nh, qv0, nqv, nsub, n_chunks, part_floats, stride});
          for (int k = 0; k < n_chunks; ++k) {
            units.push_back({i, h0, nh, qv0, nqv, lo + k * chunk, std::min(reach, lo + (k + 1) * chunk), nsub, part_floats});
            part_floats += stride;
          }
        }
      }
    }
  }

  float* outp = out.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  std::vector<float> partials(static_cast<size_t>(part_floats));

  auto write_final = [&](const Item& it, int head, int qv, const float* o, float m, float l) {
    const int r = qv / G, g = qv % G;
    const int tok = rows[it.row_off + r];
    const int64_t hq = static_cast<int64_t>(tok) * c.H + head * G + g;
    float* dst = outp + hq * D;
    if (accumulate) {  // merge into what out and lse hold, by log-sum-exp (merge.py)
      if (!(l > 0.f)) return;  // no key: adds nothing
      const float lse_new = m + std::log(l), lse_old = lsep[hq];
      const float mx = std::max(lse_old, lse_new);
      const float w_old = lse_old == kNegInf ? 0.f : std::exp(lse_old - mx);
      const float total = w_old + std::exp(lse_new - mx);
      const float a = w_old / total, b = std::exp(lse_new - mx) / (total * l);
      for (int d = 0; d < D; ++d) dst[d] = dst[d] * a + o[d] * b;
      lsep[hq] = mx + std::log(total);
      return;
    }
    if (l > 0.f) {
      const float inv = 1.f / l;
      for (int d = 0; d < D; ++d) dst[d] = o[d] * inv;
      lsep[hq] = m + std::log(l);
    } else {  // no key to attend to: weighs nothing in a merge
      for (int d = 0; d < D; ++d) dst[d] = 0.f;
      lsep[hq] = kNegInf;
    }
  };

  // Threads take units as they finish them, the costliest first: an even split of the list
  // gave one thread a causal chunk's short early rows and the other its long late ones.
  std::vector<int32_t> order(units.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  auto cost = [&](int32_t i) {
    const Unit& u = units[i];
    return static_cast<int64_t>(u.k1 - u.k0) * u.nh * u.nsub * u.nqv;
  };
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return cost(a) > cost(b); });
  std::atomic<int64_t> next{0};
  const int64_t n_units = static_cast<int64_t>(units.size());
  at::parallel_for(0, std::min<int64_t>(threads, n_units), 1, [&](int64_t, int64_t) {
    Result res(D);
    for (int64_t k = next++; k < n_units; k = next++) {
      const Unit& u = units[order[k]];
      const Item& it = items[u.item];
      attend<T>(c, it, u, res);
      for (int hi = 0; hi < u.nh * u.nsub; ++hi) {
        for (int j = 0; j < u.nqv; ++j) {
          const int v = hi * u.nqv + j;
          if (u.part < 0) {
            write_final(it, u.h0 + hi / u.nsub, u.qv0 + (hi % u.nsub) * u.nqv + j, res.out(v), res.m[v], res.l[v]);
          } else {
            float* dst = partials.data() + u.part + v * (D + 2);
            std::memcpy(dst, res.out(v), sizeof(float) * D);
            dst[D] = res.m[v];
            dst[D + 1] = res.l[v];
          }
        }
      }
    }
  });

  // Merge each split unit's runs of keys by their log-sum-exp.
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t gi = begin; gi < end; ++gi) {
      const Group& gr = groups[gi];
      const Item& it = items[gr.item];
      for (int v = 0; v < gr.nh * gr.nsub * gr.nqv; ++v) {
        auto part = [&](int k) { return partials.data() + gr.first_part + k * gr.part_stride + v * (D + 2); };
        float m = kNegInf;
        for (int k = 0; k < gr.n_chunks; ++k) m = std::max(m, part(k)[D]);
        std::fill(o.begin(), o.end(), 0.f);
        float l = 0.f;
        if (m != kNegInf) {
          for (int k = 0; k < gr.n_chunks; ++k) {
            const float* pp = part(k);
            if (pp[D] == kNegInf) continue;
            const float w = std::exp(pp[D] - m);
            for (int d = 0; d < D; ++d) o[d] += w * pp[d];
            l += w * pp[D + 1];
          }
        }
        const int b = v / gr.nqv;
        write_final(it, gr.h0 + b / gr.nsub, gr.qv0 + (b % gr.nsub) * gr.nqv + v % gr.nqv, o.data(), m, l);
      }
    }
  });
}

void paged_attention(at::Tensor out, at::Tensor lse, at::Tensor q, at::Tensor kv, int64_t page_size,
                     at::Tensor items, at::Tensor rows, at::Tensor pages, double scale, int64_t key_split,
                     int64_t window, double softcap, int64_t sub_blocks, bool fast_exp,
                     bool accumulate) {
  TORCH_CHECK(window >= 0 && window < (int64_t{1} << 30), "window must be >= 0 (0: none)");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "softcap must be >= 0 (0: none)");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) >= q.size(2) && q.stride(0) >= q.size(1) * q.stride(1),
              "q must be a (T, H, D) tensor with contiguous heads");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type(), "q and kv must have the same dtype");
  const int64_t D = q.size(2);
  const int64_t w = q.scalar_type() == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK(page_size >= 1 && page_size % w == 0 && page_size <= 1024, "page_size must be a multiple of ", w,
              " up to 1024");
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == 2 && kv.size(3) == page_size * D && kv.stride(3) == 1 &&
                  kv.stride(2) == page_size * D && kv.stride(1) == kv.size(2) * kv.stride(2),
              "kv must be a (2, pages, H_kv, page_size * D) tensor with contiguous pages");
  TORCH_CHECK(D <= kMaxD && D % w == 0, "head size above 256 or odd in bfloat16");
  TORCH_CHECK(q.size(1) % kv.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.size(1) / kv.size(2) <= kMaxQV, "more than 8 query heads per KV head");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == q.sizes(),
              "out must be a contiguous float32 tensor shaped like q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 2 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1),
              "lse must be a contiguous float32 (T, H) tensor");
  TORCH_CHECK(items.scalar_type() == at::kInt && items.is_contiguous() && items.dim() == 2 && items.size(1) == 5,
              "items must be a contiguous int32 (N, 5) tensor");
  TORCH_CHECK(rows.scalar_type() == at::kInt && rows.is_contiguous(), "rows must be int32");
  TORCH_CHECK(pages.scalar_type() == at::kInt && pages.is_contiguous(), "pages must be int32");
  const int64_t n = items.size(0);
  std::vector<Item> its(n);
  std::memcpy(its.data(), items.data_ptr<int32_t>(), sizeof(Item) * n);
  const int64_t T = q.size(0), P = kv.size(1);
  const int32_t* rp = rows.data_ptr<int32_t>();
  const int32_t* pp = pages.data_ptr<int32_t>();
  for (const Item& it : its) {
    TORCH_CHECK(it.row_off >= 0 && it.n_rows >= 0 && it.row_off + it.n_rows <= rows.numel(), "item rows out of range");
    TORCH_CHECK(it.n_keys >= 0 && it.page_off >= 0 && it.page_off + (it.n_keys + page_size - 1) / page_size <= pages.numel(),
                "item pages out of range");
    for (int r = 0; r < it.n_rows; ++r) TORCH_CHECK(rp[it.row_off + r] >= 0 && rp[it.row_off + r] < T, "row out of range");
    for (int64_t k = 0; k < (it.n_keys + page_size - 1) / page_size; ++k) {
      TORCH_CHECK(pp[it.page_off + k] >= 0 && pp[it.page_off + k] < P, "page id out of range");
    }
  }
  if (q.scalar_type() == at::kBFloat16) {
    run<uint16_t>(out, lse, q, kv, page_size, its, rp, pp, scale, key_split, window, softcap, sub_blocks, fast_exp, accumulate);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "q must be bfloat16 or float32");
    run<float>(out, lse, q, kv, page_size, its, rp, pp, scale, key_split, window, softcap, sub_blocks, fast_exp, accumulate);
  }
}

// Store a step's new keys and values in their cache slots (kv_layout.py's `write`): one
// pass over the tokens, instead of two scatters with index arithmetic per layer.
template <typename T>
void kv_write_impl(at::Tensor& kv, const at::Tensor& k, const at::Tensor& v, const int64_t* slots,
                   int64_t bs) {
  const int64_t n_tok = k.size(0), H = k.size(1), D = k.size(2);
  const int64_t w = std::is_same_v<T, uint16_t> ? 2 : 1;
  T* kc = static_cast<T*>(kv.data_ptr());
  T* vc = kc + kv.stride(0);
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  for (int64_t t = 0; t < n_tok; ++t) {
    const int64_t page = slots[t] / bs, off = slots[t] % bs;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t base = page * kv.stride(1) + h * kv.stride(2);
      const T* ks = kp + t * k.stride(0) + h * k.stride(1);
      const T* vs = vp + t * v.stride(0) + h * v.stride(1);
      T* kd = kc + base + off * w;  // keys: (D / w, bs, w)
      for (int64_t j = 0; j < D / w; ++j) {
        for (int64_t e = 0; e < w; ++e) kd[j * bs * w + e] = ks[j * w + e];
      }
      T* vd = vc + base + (off / w) * D * w + off % w;  // values: (bs / w, D, w)
      for (int64_t d = 0; d < D; ++d) vd[d * w] = vs[d];
    }
  }
}

void kv_write(at::Tensor kv, at::Tensor k, at::Tensor v, at::Tensor slots, int64_t page_size) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "k and v must be (T, H_kv, D) tensors with contiguous heads");
  TORCH_CHECK(kv.scalar_type() == k.scalar_type() && v.scalar_type() == k.scalar_type(),
              "kv, k and v must have the same dtype");
  const int64_t D = k.size(2);
  const int64_t w = k.scalar_type() == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK(page_size >= 1 && page_size % w == 0 && D % w == 0, "page_size and D must be multiples of ", w);
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == 2 && kv.size(2) == k.size(1) && kv.size(3) == page_size * D &&
                  kv.stride(3) == 1 && kv.stride(2) == page_size * D,
              "kv must be a (2, pages, H_kv, page_size * D) tensor with contiguous pages");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == k.size(0),
              "slots must be a contiguous int64 tensor, one per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t limit = kv.size(1) * page_size;
  for (int64_t t = 0; t < slots.numel(); ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < limit, "slot out of range");
  if (k.scalar_type() == at::kBFloat16) {
    kv_write_impl<uint16_t>(kv, k, v, sp, page_size);
  } else {
    TORCH_CHECK(k.scalar_type() == at::kFloat, "k must be bfloat16 or float32");
    kv_write_impl<float>(kv, k, v, sp, page_size);
  }
}

}  // namespace

TORCH_LIBRARY(prefixflow, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor(b!) lse, Tensor q, Tensor kv, int page_size, Tensor items, "
      "Tensor rows, Tensor pages, float scale, int key_split, int window=0, float softcap=0.0, "
      "int sub_blocks=8, bool fast_exp=True, bool accumulate=False) -> ()");
  m.def("kv_write(Tensor(a!) kv, Tensor k, Tensor v, Tensor slots, int page_size) -> ()");
}

TORCH_LIBRARY_IMPL(prefixflow, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("kv_write", &kv_write);
}
