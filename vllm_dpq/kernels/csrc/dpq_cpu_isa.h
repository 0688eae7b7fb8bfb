// One ISA's W4A8 kernels, included by dpq_cpu.cpp once per ISA inside that ISA's
// `#pragma GCC target` and namespace, with DPQ_AVX512 set to 1 (16 lanes) or 0 (AVX2, 8 lanes).
//
// Every function computes the numerics of vllm_dpq/numerics.py: fp8_round is
// clamp(x, -fp8_max, fp8_max).to(float8_e4m3fn) (round to nearest even, e4m3 subnormals),
// the weight chain value is fp8_round((code - 8) * s_g), the activation fp8_round(x / s_x).

#if DPQ_AVX512
constexpr int W = 16;
using vf = __m512;
using vi = __m512i;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset1(float v) { return _mm512_set1_ps(v); }
static inline vi vset1i(int v) { return _mm512_set1_epi32(v); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline vi vand(vi a, vi b) { return _mm512_and_si512(a, b); }
static inline vi vor(vi a, vi b) { return _mm512_or_si512(a, b); }
static inline vi vadd(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi vsrli(vi a, int n) { return _mm512_srli_epi32(a, n); }
static inline vf vcast(vi a) { return _mm512_castsi512_ps(a); }
static inline vi vcasti(vf a) { return _mm512_castps_si512(a); }
static inline vf vcvt(vi a) { return _mm512_cvtepi32_ps(a); }
static inline vf vlt_blend(vf x, vf lim, vf a, vf b) {  // x < lim ? a : b
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lim, _CMP_LT_OQ), b, a);
}
static inline vf vloadn(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline void vstoren(float* p, vf v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v); }
static inline void vstoren_bf16(c10::BFloat16* p, vf v, int n) {  // exact: v holds bf16 values
  __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
  _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1), h);
}
static inline vf vload_bf16n(const c10::BFloat16* p, int n) {
  __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vf vload_f16n(const c10::Half* p, int n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
}
// the 16 codes of columns 16c..16c+15: words 2c, 2c+1 of a packed row (nw words there)
static inline vi codes(const int32_t* row, int nw) {
  __m512i v = _mm512_maskz_loadu_epi32((__mmask16)((1u << nw) - 1), row);
  const __m512i sel = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i sh = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  return _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(sel, v), sh), _mm512_set1_epi32(15));
}
constexpr int WORDS = 2;  // packed words per chunk
struct Lut { vf v; };
static inline vf code_iota() {  // code - 8 for codes 0..15
  return _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
}
#else
constexpr int W = 8;
using vf = __m256;
using vi = __m256i;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset1(float v) { return _mm256_set1_ps(v); }
static inline vi vset1i(int v) { return _mm256_set1_epi32(v); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vabs(vf a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
static inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
static inline float vhmax(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
static inline vi vand(vi a, vi b) { return _mm256_and_si256(a, b); }
static inline vi vor(vi a, vi b) { return _mm256_or_si256(a, b); }
static inline vi vadd(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline vi vsrli(vi a, int n) { return _mm256_srli_epi32(a, n); }
static inline vf vcast(vi a) { return _mm256_castsi256_ps(a); }
static inline vi vcasti(vf a) { return _mm256_castps_si256(a); }
static inline vf vcvt(vi a) { return _mm256_cvtepi32_ps(a); }
static inline vf vlt_blend(vf x, vf lim, vf a, vf b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, lim, _CMP_LT_OQ)); }
static inline __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vloadn(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
static inline void vstoren(float* p, vf v, int n) { _mm256_maskstore_ps(p, tail_mask(n), v); }
static inline void vstoren_bf16(c10::BFloat16* p, vf v, int n) {
  alignas(32) uint32_t b[8];
  _mm256_store_si256((__m256i*)b, _mm256_srli_epi32(_mm256_castps_si256(v), 16));
  for (int i = 0; i < n; ++i) reinterpret_cast<uint16_t*>(p)[i] = (uint16_t)b[i];
}
static inline vf vload_bf16n(const c10::BFloat16* p, int n) {
  alignas(16) uint16_t b[8] = {0};
  for (int i = 0; i < n; ++i) b[i] = reinterpret_cast<const uint16_t*>(p)[i];
  __m256i w = _mm256_cvtepu16_epi32(_mm_load_si128((const __m128i*)b));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline vf vload_f16n(const c10::Half* p, int n) {
  alignas(16) uint16_t b[8] = {0};
  for (int i = 0; i < n; ++i) b[i] = reinterpret_cast<const uint16_t*>(p)[i];
  return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)b));
}
static inline vi codes(const int32_t* row, int nw) {
  (void)nw;  // one word per chunk, always in the row
  const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(row[0]), sh), _mm256_set1_epi32(15));
}
constexpr int WORDS = 1;
struct Lut { vf lo, hi; };
#endif

// clamp(x, -lim, lim) rounded to the nearest e4m3 value, ties to even; fp32 lanes.
static inline vf fp8_round(vf x, vf lim) {
  x = vmin(vmax(x, vzero() - lim), lim);
  vi bits = vcasti(x);
  vi sign = vand(bits, vset1i((int)0x80000000u));
  vf a = vabs(x);
  vi ai = vcasti(a);
  // normal e4m3: keep 3 mantissa bits, round to nearest even on the fp32 bits
  vi lsb = vand(vsrli(ai, 20), vset1i(1));
  vi normal = vand(vadd(ai, vadd(vset1i(0x7ffff), lsb)), vset1i((int)0x7ff00000));
  // below 2^-6: multiples of 2^-9 (the ulp of 2^14 in fp32 is 2^-9)
  vf sub = (a + vset1(16384.0f)) - vset1(16384.0f);
  vf r = vlt_blend(a, vset1(0.015625f), sub, vcast(normal));
  return vcast(vor(vcasti(r), sign));
}

#if DPQ_AVX512
static inline Lut make_lut(float s, vf lim) { return Lut{fp8_round(_mm512_mul_ps(code_iota(), vset1(s)), lim)}; }
static inline vf lookup(const Lut& t, vi idx) { return _mm512_permutexvar_ps(idx, t.v); }
#else
static inline Lut make_lut(float s, vf lim) {
  const vf lo = _mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), hi = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  return Lut{fp8_round(_mm256_mul_ps(lo, vset1(s)), lim), fp8_round(_mm256_mul_ps(hi, vset1(s)), lim)};
}
static inline vf lookup(const Lut& t, vi idx) {
  vf a = _mm256_permutevar8x32_ps(t.lo, idx), b = _mm256_permutevar8x32_ps(t.hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

// f(c, v) for every chunk c (columns c*W .. c*W+W-1) of row n, v its FP8 weight values in
// fp32 lanes. The table of the 16 chain values is made once per group (a group that is not a
// multiple of W columns, rare: per-lane scales for the chunks across a boundary).
template <typename F>
static inline void row_chunks(const Weights& w, int64_t n, F&& f) {
  const int32_t* row = w.packed + n * w.kw;
  const ScaleRow sr = w.scale_row(n);
  const vf lim = vset1(w.fp8_max);
  const int64_t chunks = (w.k + W - 1) / W;
  auto idx = [&](int64_t c) { return codes(row + c * WORDS, (int)std::min<int64_t>(WORDS, w.kw - c * WORDS)); };
  if (w.group % W == 0 || w.groups == 1) {
    const int64_t per_group = w.groups == 1 ? chunks : w.group / W;
    int64_t c = 0;
    for (int64_t g = 0; g < w.groups; ++g) {
      const Lut lut = make_lut(sr.at(g), lim);
      for (const int64_t end = std::min(chunks, c + per_group); c < end; ++c) f(c, lookup(lut, idx(c)));
    }
    return;
  }
  alignas(64) float s[W];
  for (int64_t c = 0; c < chunks; ++c) {
    for (int l = 0; l < W; ++l) s[l] = sr.at(std::min(c * W + l, w.k - 1) / w.group);
    f(c, fp8_round(vcvt(vadd(idx(c), vset1i(-8))) * vload(s), lim));
  }
}

#if DPQ_AVX512
// The same in 32-column chunks with the FP8 values as bf16 words (exact), by one 16-bit
// permute per chunk; for groups that are multiples of 32 columns, or one group.
static inline bool chunks32_ok(const Weights& w) { return w.group % 32 == 0 || w.groups == 1; }

static inline __m512i codes32(const int32_t* row, int nw) {  // words 4c..4c+3 -> 32 16-bit codes
  const __m128i b = nw >= 4 ? _mm_loadu_si128((const __m128i*)row) : _mm_maskz_loadu_epi32((__mmask8)((1u << nw) - 1), row);
  const __m512i d = _mm512_cvtepu8_epi32(b);
  return _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(15)),
                         _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xf0)), 12));
}

// The chain tables of groups g and g + 1 in one vector of 32 16-bit lanes (bf16 words; lanes
// 0..15: group g's codes 0..15, lanes 16..31: group g + 1's). fp8 rounding is odd-symmetric,
// so one rounding of |c| * s for |c| = 1..8 serves both signs: one fp8_round per two groups.
static inline __m512i lut16x2(float s0, float s1, vf lim) {
  const vf mag = _mm512_set_ps(8, 7, 6, 5, 4, 3, 2, 1, 8, 7, 6, 5, 4, 3, 2, 1);
  const vf sc = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
  const vf r = fp8_round(_mm512_mul_ps(mag, sc), lim);  // lanes 0..7: |c| * s0, 8..15: |c| * s1
  const __m512i m = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(r), 16)));
  // lane 16h + e (code e of group h) <- lane 8h + (e < 8 ? 7 - e : e - 9), sign for e < 8, 0 for e == 8
  const __m512i src = _mm512_set_epi16(14, 13, 12, 11, 10, 9, 8, 0, 8, 9, 10, 11, 12, 13, 14, 15,
                                       6, 5, 4, 3, 2, 1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i sign = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, -32768, -32768, -32768, -32768, -32768, -32768,
                                        -32768, -32768, 0, 0, 0, 0, 0, 0, 0, 0, -32768, -32768, -32768, -32768,
                                        -32768, -32768, -32768, -32768);
  const __mmask32 nonzero = ~((__mmask32)1 << 8 | (__mmask32)1 << 24);
  return _mm512_or_si512(_mm512_maskz_permutexvar_epi16(nonzero, src, m), sign);
}

template <typename F>
static inline void row_chunks32(const Weights& w, int64_t n, F&& f) {
  const int32_t* row = w.packed + n * w.kw;
  const ScaleRow sr = w.scale_row(n);
  const vf lim = vset1(w.fp8_max);
  const int64_t chunks = (w.k + 31) / 32;
  const int64_t per_group = w.groups == 1 ? chunks : w.group / 32;
  const __m512i second = _mm512_set1_epi16(16);
  int64_t c = 0;
  for (int64_t g = 0; g < w.groups; g += 2) {
    const __m512i lut = lut16x2(sr.at(g), sr.at(std::min(g + 1, w.groups - 1)), lim);
    for (int h = 0; h < 2 && c < chunks; ++h) {
      for (const int64_t end = std::min(chunks, c + per_group); c < end; ++c) {
        __m512i idx = codes32(row + 4 * c, (int)std::min<int64_t>(4, w.kw - 4 * c));
        f(c, _mm512_permutexvar_epi16(h ? _mm512_or_si512(idx, second) : idx, lut));
      }
    }
  }
}

static inline __mmask32 mask32(int64_t cols) { return cols >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << cols) - 1); }
#endif

// Dequantize rows [n0, n1) to out [N, K] (fp32 or bf16; FP8 values are exact in both).
template <typename T>
static void dequant_rows(const Weights& w, T* out, int64_t n0, int64_t n1) {
#if DPQ_AVX512
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (chunks32_ok(w)) {
      for (int64_t n = n0; n < n1; ++n) {
        T* o = out + n * w.k;
        row_chunks32(w, n, [&](int64_t c, __m512i v) { _mm512_mask_storeu_epi16(o + 32 * c, mask32(w.k - 32 * c), v); });
      }
      return;
    }
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    T* o = out + n * w.k;
    row_chunks(w, n, [&](int64_t c, vf v) {
      const int cols = (int)std::min<int64_t>(W, w.k - c * W);
      if constexpr (std::is_same_v<T, float>) {
        vstoren(o + c * W, v, cols);
      } else {
        vstoren_bf16(o + c * W, v, cols);
      }
    });
  }
}

template <typename T>
static inline vf load_x(const T* p, int n) {
  if constexpr (std::is_same_v<T, float>) {
    return vloadn(p, n);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return vload_bf16n(p, n);
  } else {
    return vload_f16n(p, n);
  }
}

// Quantize activation rows [m0, m1) of x [M, K] to FP8 values (x8 [M, ldo] as O = float or
// bf16, columns K..ldo zero) and their scales s_x [M] (dynamic: amax / fp8_max, at least
// FLT_MIN; static: the given scale). x is read once: into a fp32 row buffer, with its amax.
template <typename T, typename O>
static void quantize_rows(const T* x, int64_t k, float fp8_max, const float* static_scale, O* x8, int64_t ldo,
                          float* sx, int64_t m0, int64_t m1) {
  const vf lim = vset1(fp8_max);
  std::vector<float> row(k + W);
  for (int64_t m = m0; m < m1; ++m) {
    const T* xr = x + m * k;
    O* o = x8 + m * ldo;
    vf amax = vzero();
    for (int64_t j = 0; j < k; j += W) {
      const int n = (int)std::min<int64_t>(W, k - j);
      const vf v = load_x(xr + j, n);
      amax = vmax(amax, vabs(v));
      vstore(row.data() + j, v);
    }
    const float s = static_scale ? *static_scale : std::max(vhmax(amax) / fp8_max, std::numeric_limits<float>::min());
    sx[m] = s;
    const vf vs = vset1(s);
    for (int64_t j = 0; j < k; j += W) {
      const int n = (int)std::min<int64_t>(W, k - j);
      const vf q = fp8_round(vdiv(vload(row.data() + j), vs), lim);
      if constexpr (std::is_same_v<O, float>) {
        vstoren(o + j, q, n);
      } else {
        vstoren_bf16(o + j, q, n);
      }
    }
    for (int64_t j = k; j < ldo; ++j) o[j] = O(0.0f);
  }
}

// acc[m, n] = sum_k x8[m, k] * w8[n, k] for rows n0..n1, MB activation rows at a time
// (x8 [M, ldx] zero-padded to a multiple of W); the weights are dequantized in registers.
template <int MB>
static inline void gemv_block(const Weights& w, const float* x8, int64_t ldx, int64_t m0, int64_t n,
                              float* acc_out, int64_t ldacc) {
  vf acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = vzero();
  const float* xb = x8 + m0 * ldx;
  row_chunks(w, n, [&](int64_t c, vf v) {
    for (int i = 0; i < MB; ++i) acc[i] = vfma(v, vload(xb + i * ldx + c * W), acc[i]);
  });
  for (int i = 0; i < MB; ++i) acc_out[(m0 + i) * ldacc + n] = vsum(acc[i]);
}

#if DPQ_BF16
// The fused kernel with AVX512-BF16 dot products (x8 bf16 [M, ldx], ldx a multiple of 32,
// zero-padded): exact products, fp32 accumulation; chunks32_ok(w) only.
template <int MB>
static inline void gemv_block_bf16(const Weights& w, const uint16_t* x8, int64_t ldx, int64_t m0, int64_t n,
                                   float* acc_out, int64_t ldacc) {
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  const uint16_t* xb = x8 + m0 * ldx;
  row_chunks32(w, n, [&](int64_t c, __m512i v) {
    for (int i = 0; i < MB; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)v, (__m512bh)_mm512_loadu_si512(xb + i * ldx + 32 * c));
  });
  for (int i = 0; i < MB; ++i) acc_out[(m0 + i) * ldacc + n] = _mm512_reduce_add_ps(acc[i]);
}
#define DPQ_GEMV_BLOCK gemv_block_bf16
#define DPQ_GEMV_ROWS gemv_rows_bf16
#define DPQ_X_T uint16_t
#include "dpq_cpu_rows.h"
#endif

#define DPQ_GEMV_BLOCK gemv_block
#define DPQ_GEMV_ROWS gemv_rows
#define DPQ_X_T float
#include "dpq_cpu_rows.h"
// y[m, n] = (acc[m, n] * s_x[m]) * s_w[n] (+ bias[n]) in fp32, rounded to T (nearest even):
// numerics.w4a8_matmul's epilogue, operation for operation.
template <typename A, typename T>
static void epilogue_rows(const A* acc, const float* sx, const float* sw, bool sw_per_n, const float* bias,
                          T* y, int64_t n, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const vf s = vset1(sx[m]);
    for (int64_t j = 0; j < n; j += W) {
      const int c = (int)std::min<int64_t>(W, n - j);
      vf v = (load_x(acc + m * n + j, c) * s) * (sw_per_n ? vloadn(sw + j, c) : vset1(sw[0]));
      if (bias) v = v + vloadn(bias + j, c);
      T* o = y + m * n + j;
      if constexpr (std::is_same_v<T, float>) {
        vstoren(o, v, c);
      } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        vi u = vcasti(v);
        u = vand(vadd(u, vadd(vset1i(0x7fff), vand(vsrli(u, 16), vset1i(1)))), vset1i((int)0xffff0000u));
        vstoren_bf16(o, vcast(u), c);
      } else {
        alignas(64) float t[W];
        vstore(t, v);
        for (int i = 0; i < c; ++i) o[i] = static_cast<T>(t[i]);
      }
    }
  }
}
