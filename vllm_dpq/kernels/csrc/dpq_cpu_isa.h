// One ISA's W4A8 kernels, included by dpq_cpu.cpp once per ISA inside that ISA's
// `#pragma GCC target` and namespace, with DPQ_AVX512 set to 1 (16 lanes) or 0 (AVX2, 8 lanes).
//
// Every function computes the numerics of vllm_dpq/numerics.py: the weight chain values
// fp8(clamp((code - 8) * s_g)) come from chain_table (dpq_cpu.cpp); the activation is
// fp8_round(x / s_x), fp8_round being clamp(x, -fp8_max, fp8_max).to(float8_e4m3fn) (round to
// nearest even, e4m3 subnormals).

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
static inline vi vloadi(const uint32_t* p) { return _mm512_loadu_si512(p); }
static inline void vstorei(uint32_t* p, vi v) { _mm512_storeu_si512(p, v); }
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
struct Lut { vf v; };  // the chain values of codes 0..15, fp32
static inline Lut load_lut(const uint16_t* t) {
  return Lut{_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)t)), 16))};
}
static inline vf lookup(const Lut& t, vi idx) { return _mm512_permutexvar_ps(idx, t.v); }
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
static inline vi vloadi(const uint32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void vstorei(uint32_t* p, vi v) { _mm256_storeu_si256((__m256i*)p, v); }
static inline vf vlt_blend(vf x, vf lim, vf a, vf b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, lim, _CMP_LT_OQ)); }
static inline __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// the n-element forms take the whole vector when n == 8 (most calls): AMD's masked stores
// (vmaskmovps) are microcoded, many times the cost of a plain store
static inline vf vloadn(const float* p, int n) { return n == W ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n)); }
static inline void vstoren(float* p, vf v, int n) {
  if (n == W) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, tail_mask(n), v);
  }
}
static inline void vstoren_bf16(c10::BFloat16* p, vf v, int n) {
  const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i b = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  if (n == W) {
    _mm_storeu_si128((__m128i*)p, b);
  } else {
    alignas(16) uint16_t t[8];
    _mm_store_si128((__m128i*)t, b);
    for (int i = 0; i < n; ++i) reinterpret_cast<uint16_t*>(p)[i] = t[i];
  }
}
// the n 16-bit values at p, zero past them
static inline __m128i load_u16n(const void* p, int n) {
  if (n == W) return _mm_loadu_si128((const __m128i*)p);
  alignas(16) uint16_t b[8] = {0};
  for (int i = 0; i < n; ++i) b[i] = reinterpret_cast<const uint16_t*>(p)[i];
  return _mm_load_si128((const __m128i*)b);
}
static inline vf vload_bf16n(const c10::BFloat16* p, int n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load_u16n(p, n)), 16));
}
static inline vf vload_f16n(const c10::Half* p, int n) { return _mm256_cvtph_ps(load_u16n(p, n)); }
static inline vi codes(const int32_t* row, int nw) {
  (void)nw;  // one word per chunk, always in the row
  const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(row[0]), sh), _mm256_set1_epi32(15));
}
constexpr int WORDS = 1;
struct Lut { vf lo, hi; };  // the chain values of codes 0..7 and 8..15, fp32
static inline vf bf16x8(const uint16_t* t) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)t)), 16));
}
static inline Lut load_lut(const uint16_t* t) { return Lut{bf16x8(t), bf16x8(t + 8)}; }
static inline vf lookup(const Lut& t, vi idx) {
  vf a = _mm256_permutevar8x32_ps(t.lo, idx), b = _mm256_permutevar8x32_ps(t.hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
// The fp32 GEMM's order of a 64-column chunk (make_tile_k): slot p holds column k_col(p). Vector
// v = p / 8 comes from the even (v < 4) or odd codes' values, low or high 16 bytes of each 128-bit
// lane, low or high bf16 word of each 32-bit pair; lane element p % 8 = 4 * lane + pair.
static constexpr int k_col(int p) {
  return 32 * (p / 4 % 2) + 16 * (p / 16 % 2) + 4 * (p % 4) + 2 * (p / 8 % 2) + p / 32;
}
// o[p] = r[k_col(p)], p < 64: per half h, a 4 x 4 transpose within each 128-bit lane (lane l: columns
// 32l + 16h + 4d + i, rows d) gives the vectors of columns 4d + i
static inline void k_order(const float* r, float* o) {
  for (int h = 0; h < 2; ++h) {
    __m256 v[4];
    for (int d = 0; d < 4; ++d) v[d] = _mm256_loadu2_m128(r + 32 + 16 * h + 4 * d, r + 16 * h + 4 * d);
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    const __m256 c[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xee), _mm256_shuffle_ps(t1, t3, 0x44),
                         _mm256_shuffle_ps(t1, t3, 0xee)};
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * (4 * (i % 2) + 2 * h + i / 2), c[i]);
  }
}
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

// The FP8 weight values of W rows [n0, n0 + W) (rows past N repeat the last row), W columns at a
// time in order: chunk c of row i in r[i], lanes over K, fp32. Past K: finite values of no
// meaning. Each row's table of the 16 chain values is loaded when the chunks enter a new group;
// groups that are not a multiple of W (rare): a table per lane.
struct RowBlock {
  const Weights& w;
  const int32_t* row[W];
  ScaleRow sr[W];
  int64_t per_group, end = 0, g = -1;  // chunks per group (0: not a multiple of W); current group
  Lut lut[W];

  RowBlock(const Weights& w_, int64_t n0) : w(w_) {
    for (int i = 0; i < W; ++i) {
      const int64_t n = std::min(n0 + i, w.n - 1);
      row[i] = w.packed + n * w.kw;
      sr[i] = w.scale_row(n);
    }
    per_group = w.groups == 1 ? (w.k + W - 1) / W : w.group % W == 0 ? w.group / W : 0;
  }

  void chunk(int64_t c, vi r[W]) {
    const int nw = (int)std::min<int64_t>(WORDS, w.kw - c * WORDS);
    if (per_group == 0) {
      alignas(64) uint32_t code[W], v[W];
      for (int i = 0; i < W; ++i) {
        vstorei(code, codes(row[i] + c * WORDS, nw));
        for (int l = 0; l < W; ++l) v[l] = (uint32_t)w.table(sr[i], std::min(c * W + l, w.k - 1) / w.group)[code[l]] << 16;
        r[i] = vloadi(v);
      }
      return;
    }
    if (c >= end) {
      end += per_group;
      ++g;
      for (int i = 0; i < W; ++i) lut[i] = load_lut(w.table(sr[i], g));
    }
    for (int i = 0; i < W; ++i) r[i] = vcasti(lookup(lut[i], codes(row[i] + c * WORDS, nw)));
  }
};

// Dequantize rows [n0, n1) to out (row n at out + (n - n0) * ld; fp32 or bf16: FP8 values are
// exact in both).
template <typename T>
static void dequant_rows(const Weights& w, T* out, int64_t ld, int64_t n0, int64_t n1) {
  for (int64_t b = n0; b < n1; b += W) {
    RowBlock rb(w, b);
    vi r[W];
    for (int64_t c = 0; c * W < w.k; ++c) {
      rb.chunk(c, r);
      const int cols = (int)std::min<int64_t>(W, w.k - c * W);
      for (int i = 0; i < W && b + i < n1; ++i) {
        T* o = out + (b + i - n0) * ld + c * W;
        if constexpr (std::is_same_v<T, float>) {
          vstoren(o, vcast(r[i]), cols);
        } else {
          vstoren_bf16(o, vcast(r[i]), cols);
        }
      }
    }
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
// gemm_order: each chunk stored in the order of this ISA's GEMM: bf16 pairs (AVX-512, ldo a
// multiple of 32: even columns then odd ones), or the AVX2 fp32 GEMM's (ldo a multiple of 64: k_col).
template <typename T, typename O>
static void quantize_rows(const T* x, int64_t k, float fp8_max, const float* static_scale, O* x8, int64_t ldo,
                          float* sx, int64_t m0, int64_t m1, bool gemm_order) {
  const vf lim = vset1(fp8_max);
  std::vector<float> row(std::max(k + W, ldo));
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
#if !DPQ_AVX512
    if constexpr (std::is_same_v<O, float>) {
      if (gemm_order) {
        std::copy(o, o + ldo, row.data());
        for (int64_t j = 0; j < ldo; j += 64) k_order(row.data() + j, o + j);
      }
    }
#else
    if constexpr (std::is_same_v<O, c10::BFloat16>) {
      const __m512i order = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24, 22,
                                             20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      for (int64_t j = 0; gemm_order && j < ldo; j += 32)
        _mm512_storeu_si512(o + j, _mm512_permutexvar_epi16(order, _mm512_loadu_si512(o + j)));
    }
#endif
  }
}

// ---- The GEMMs (every M). Each multiplies MR activation rows at a time by a cache-resident tile
// of the FP8 values of NR = 2W weight rows (lanes over N) into vector accumulators and applies
// the epilogue in registers. Every output is the sum of a few partial sums ("chains"), each over
// its share of K in order, added in chain order: the result of a row does not depend on M, the
// block or the thread (batch-invariant), and at small M the chains keep the multiply units busy
// (CP chains run at a time, all of them where the accumulators fit in registers).
constexpr int NR = 2 * W;

// The codes and scales of NR weight rows from n0 (the block this thread does next), brought into
// L1 a few cache lines per step while this block's tile is made: the tile build reads four rows
// of a few hundred bytes at a time, too short for the hardware prefetcher, and without this it
// waits on those loads (2 threads, SmolLM2's layers, bf16 pairs: 1.4x faster at M = 1, 1.12x at
// M = 32; fp32: 1.2-1.3x, 1.07-1.17x).
struct Prefetch {
  const char *p = nullptr, *end = nullptr;
  int64_t per_step = 0;
  Prefetch(const Weights& w, int64_t n0, int64_t steps) {
    if (n0 >= w.n) return;
    const int64_t n1 = std::min(n0 + NR, w.n), sb = w.fp8_scales ? 1 : 2;
    const char* s = static_cast<const char*>(w.scales);
    for (const char* q = s + n0 * w.groups * sb; q < s + n1 * w.groups * sb; q += 64) _mm_prefetch(q, _MM_HINT_T0);
    p = reinterpret_cast<const char*>(w.packed + n0 * w.kw);
    end = reinterpret_cast<const char*>(w.packed + n1 * w.kw);
    per_step = ((end - p + 63) / 64 + steps - 1) / steps;
  }
  inline void step() {
    for (int64_t i = 0; i < per_step && p < end; ++i, p += 64) _mm_prefetch(p, _MM_HINT_T0);
  }
};

// with(rows, f): f(std::integral_constant<int, rows>) for rows in 1..R
template <int R, typename F>
static inline void with_rows(int rows, F&& f) {
  if (rows == R) {
    f(std::integral_constant<int, R>{});
  } else if constexpr (R > 1) {
    with_rows<R - 1>(rows, f);
  }
}

// how many of `chains` chains run at a time when each takes `per_chain` of `budget` accumulators
static constexpr int chains_at_once(int chains, int per_chain, int budget) {
  while (chains > 1 && chains * per_chain > budget) chains /= 2;
  return chains;
}

template <typename T>
static inline void store_out(const Epilogue& e, int64_t m, int64_t j, vf acc, T* y);

#if DPQ_AVX512
static inline vi vunpack32(vi a, vi b, bool hi) { return hi ? _mm512_unpackhi_epi32(a, b) : _mm512_unpacklo_epi32(a, b); }
static inline vi vunpack64(vi a, vi b, bool hi) { return hi ? _mm512_unpackhi_epi64(a, b) : _mm512_unpacklo_epi64(a, b); }
#else
static inline vi vunpack32(vi a, vi b, bool hi) { return hi ? _mm256_unpackhi_epi32(a, b) : _mm256_unpacklo_epi32(a, b); }
static inline vi vunpack64(vi a, vi b, bool hi) { return hi ? _mm256_unpackhi_epi64(a, b) : _mm256_unpacklo_epi64(a, b); }
#endif

// r[i][j] <- r[j][i], W x W 32-bit values: 4 x 4 blocks within each 128-bit lane, then the lanes
static inline void transpose(vi r[W]) {
  vi t[W];
  for (int i = 0; i < W; i += 2) {
    t[i] = vunpack32(r[i], r[i + 1], false);
    t[i + 1] = vunpack32(r[i], r[i + 1], true);
  }
  for (int i = 0; i < W; i += 4) {
    r[i] = vunpack64(t[i], t[i + 2], false);
    r[i + 1] = vunpack64(t[i], t[i + 2], true);
    r[i + 2] = vunpack64(t[i + 1], t[i + 3], false);
    r[i + 3] = vunpack64(t[i + 1], t[i + 3], true);
  }
  // r[4q + j], 128-bit lane l: column 4l + j of rows 4q..4q+3
  for (int j = 0; j < 4; ++j) {
#if DPQ_AVX512
    const vi u0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    const vi v0 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), v1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    t[j] = _mm512_shuffle_i32x4(u0, v0, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(u1, v1, 0x88);
    t[8 + j] = _mm512_shuffle_i32x4(u0, v0, 0xdd);
    t[12 + j] = _mm512_shuffle_i32x4(u1, v1, 0xdd);
#else
    t[j] = _mm256_permute2x128_si256(r[j], r[4 + j], 0x20);
    t[4 + j] = _mm256_permute2x128_si256(r[j], r[4 + j], 0x31);
#endif
  }
  for (int i = 0; i < W; ++i) r[i] = t[i];
}

#if DPQ_AVX512
// -- fp32 (AVX-512): the values of W rows (RowBlock, lanes over K) transposed in registers into
// a tile [slot][NR], one fp32 value per slot; one FMA per slot and row; chain c: slots c + 4i.
constexpr int CHAINS = 4;
constexpr int MR = 12;  // 24 accumulators + 2 weight vectors + 1 broadcast of 32 registers

// acc[i][h] += x[i * ldx + p] * the tile's slot p (rows h * W..)
template <int MR_>
static inline void slot_step(const uint32_t* tile, const float* x, int64_t ldx, int64_t p, vf acc[MR_][2]) {
  const vf w0 = vcast(vloadi(tile + p * NR)), w1 = vcast(vloadi(tile + p * NR + W));
  for (int i = 0; i < MR_; ++i) {
    const vf xb = vset1(x[i * ldx + p]);
    acc[i][0] = vfma(xb, w0, acc[i][0]);
    acc[i][1] = vfma(xb, w1, acc[i][1]);
  }
}

// the tile of weight rows [n0, n0 + NR): tile[slot][NR] (slots rounded up to W)
static void make_tile(const Weights& w, int64_t n0, int64_t slots, uint32_t* tile, int64_t prefetch_n0) {
  Prefetch next(w, prefetch_n0, 2 * ((slots + W - 1) / W));
  for (int h = 0; h < NR; h += W) {
    RowBlock rb(w, n0 + h);
    vi r[W];
    for (int64_t s = 0, c = 0; s < slots; s += W, ++c) {
      next.step();
      rb.chunk(c, r);
      transpose(r);
      for (int i = 0; i < W; ++i) vstorei(tile + (s + i) * NR + h, r[i]);
    }
  }
}

// y[m0:m0+MR_, n0:n0+NR] from the tile; x [M, ldx] (fp32, zero past K)
template <int MR_, typename T>
static inline void tile_rows(const uint32_t* tile, int64_t slots, const float* x, int64_t ldx, int64_t m0,
                             int64_t n0, const Epilogue& e, T* y) {
  constexpr int CP = chains_at_once(CHAINS, 2 * MR_, 2 * MR);
  const float* xr = x + m0 * ldx;
  vf sum[MR_][2];
  for (int c0 = 0; c0 < CHAINS; c0 += CP) {
    vf acc[CP][MR_][2];
    for (int c = 0; c < CP; ++c)
      for (int i = 0; i < MR_; ++i) acc[c][i][0] = acc[c][i][1] = vzero();
    int64_t p = c0;
    for (; p + CHAINS <= slots + c0; p += CHAINS)
      for (int c = 0; c < CP; ++c) slot_step<MR_>(tile, xr, ldx, p + c, acc[c]);
    for (int c = 0; c < CP && p + c < slots; ++c) slot_step<MR_>(tile, xr, ldx, p + c, acc[c]);
    for (int c = 0; c < CP; ++c)
      for (int i = 0; i < MR_; ++i)
        for (int h = 0; h < 2; ++h) sum[i][h] = c0 + c == 0 ? acc[c][i][h] : sum[i][h] + acc[c][i][h];
  }
  for (int i = 0; i < MR_; ++i) {
    store_out(e, m0 + i, n0, sum[i][0], y);
    store_out(e, m0 + i, n0 + W, sum[i][1], y);
  }
}
#else
#include "dpq_cpu_avx2.h"
#endif

#if DPQ_BF16
// -- bf16 pairs (AVX512-BF16; groups that are whole 32-column chunks, or one group): vdpbf16ps
// multiplies 32-bit slots of two bf16 values, both exact products added in fp32. The values are
// made without a transpose: the 16-byte code chunks (32 columns) of four rows fill the four
// 128-bit lanes, and per lane a byte shuffle through the row's table gives the low and the high
// bytes of the bf16 values of the even and of the odd codes. Interleaving those bytes gives four
// vectors, slot sets j = 0..3, each with four pair slots of each row: columns (0,2)..(12,14) of the
// chunk, (16,18)..(28,30), (1,3)..(13,15), (17,19)..(29,31); the activations are stored in that
// order (quantize_rows' gemm_order), so a 128-bit broadcast of x multiplies a set. A row's output
// sums its lane's four slots at the end; chain g: sets 2g and 2g + 1 of every chunk, in order (two
// chains: long passes over K at large M, where they run one after another). The lanes of quad q of a
// 16-row half hold rows q, q + 4, q + 8, q + 12, so that these sums come out in row order.
static inline bool chunks32_ok(const Weights& w) { return w.group % 32 == 0 || w.groups == 1; }
constexpr int MRP = 6;  // 24 accumulators (4 quads) + 4 weight vectors + 1 broadcast
constexpr int PAIR_CHAINS = 2;

// lane r of lo / hi: the low / high bytes of the 16 chain values of table t[r]
static inline void pair_tables(const uint16_t* const t[4], __m512i& lo, __m512i& hi) {
  const __m512i split = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  auto two = [&](const uint16_t* a, const uint16_t* b) {  // qwords: low, high bytes of a[0:8], a[8:16], b[0:8], b[8:16]
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                                         _mm256_loadu_si256((const __m256i*)b), 1);
    return _mm512_shuffle_epi8(v, split);
  };
  const __m512i a = two(t[0], t[1]), b = two(t[2], t[3]);
  lo = _mm512_permutex2var_epi64(a, _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0), b);
  hi = _mm512_permutex2var_epi64(a, _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1), b);
}

// The tile of weight rows [n0, n0 + NR), chunks of 32 columns: vector pair_vector(chunks, h, j,
// c, q) is slot set j of chunk c, quad q of half h. A GEMM pass (half h, chain g = j / 2) reads
// one contiguous quarter of the tile, which the hardware prefetcher streams.
static inline int64_t pair_vector(int64_t chunks, int h, int j, int64_t c, int q) {
  return (((h * PAIR_CHAINS + j / 2) * chunks + c) * 2 + j % 2) * 4 + q;
}
// The four rows of quad q of half h of the block from n0 (lanes r: row n0 + W h + q + 4r), their
// chain tables (lo / hi: pair_tables) loaded as chunk() enters each group
struct Quad {
  const int32_t* row[4];
  ScaleRow sr[4];
  __m512i lo, hi;
  int64_t per_group;  // 32-column chunks per group

  Quad(const Weights& w, int64_t n0, int h, int q, int64_t chunks) : per_group(w.groups == 1 ? chunks : w.group / 32) {
    for (int r = 0; r < 4; ++r) {
      const int64_t n = std::min(n0 + W * h + q + 4 * r, w.n - 1);
      row[r] = w.packed + n * w.kw;
      sr[r] = w.scale_row(n);
    }
  }

  // slot sets j = 0..3 of chunk c (chunks in order from 0)
  inline void chunk(const Weights& w, int64_t c, __m512i set[4]) {
    if (c % per_group == 0) {
      const uint16_t* t[4];
      for (int r = 0; r < 4; ++r) t[r] = w.table(sr[r], c / per_group);
      pair_tables(t, lo, hi);
    }
    const int nw = (int)std::min<int64_t>(4, w.kw - 4 * c);
    auto part = [&](int r) {
      return nw == 4 ? _mm_loadu_si128((const __m128i*)(row[r] + 4 * c))
                     : _mm_maskz_loadu_epi32((__mmask8)((1u << nw) - 1), row[r] + 4 * c);
    };
    __m512i v = _mm512_castsi128_si512(part(0));
    v = _mm512_inserti32x4(v, part(1), 1);
    v = _mm512_inserti32x4(v, part(2), 2);
    v = _mm512_inserti32x4(v, part(3), 3);
    const __m512i nibble = _mm512_set1_epi8(15);
    const __m512i even = _mm512_and_si512(v, nibble), odd = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    const __m512i el = _mm512_shuffle_epi8(lo, even), eh = _mm512_shuffle_epi8(hi, even);
    const __m512i ol = _mm512_shuffle_epi8(lo, odd), oh = _mm512_shuffle_epi8(hi, odd);
    set[0] = _mm512_unpacklo_epi8(el, eh);
    set[1] = _mm512_unpackhi_epi8(el, eh);
    set[2] = _mm512_unpacklo_epi8(ol, oh);
    set[3] = _mm512_unpackhi_epi8(ol, oh);
  }
};

static void make_tile_pairs(const Weights& w, int64_t n0, int64_t chunks, uint32_t* tile, int64_t prefetch_n0) {
  Prefetch next(w, prefetch_n0, 8 * chunks);
  for (int h = 0; h < 2; ++h) {
    for (int q = 0; q < 4; ++q) {
      Quad quad(w, n0, h, q, chunks);
      __m512i set[4];
      for (int64_t c = 0; c < chunks; ++c) {
        next.step();
        quad.chunk(w, c, set);
        for (int j = 0; j < 4; ++j) _mm512_storeu_si512(tile + pair_vector(chunks, h, j, c, q) * W, set[j]);
      }
    }
  }
}

// lane 4r + q of the result: the sum of lane r's four slots of a[q] (fixed order)
static inline vf lane_sums(const vf a[4]) {
  const vf s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const vf s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  const __m512d d01 = _mm512_castps_pd(s01), d23 = _mm512_castps_pd(s23);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)), _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
}

// y[m0:m0+MR_, n0:n0+NR] from the pairs tile; x [M, ldx slots] in pair order, zero past K
template <int MR_, typename T>
static inline void tile_rows_pairs(const uint32_t* tile, int64_t chunks, const slot_t* x, int64_t ldx, int64_t m0,
                                   int64_t n0, const Epilogue& e, T* y) {
  constexpr int CP = chains_at_once(PAIR_CHAINS, 4 * MR_, 4 * MRP);
  for (int h = 0; h < 2; ++h) {
    vf sum[MR_][4];
    for (int g0 = 0; g0 < PAIR_CHAINS; g0 += CP) {
      vf acc[CP][MR_][4];
      for (int g = 0; g < CP; ++g)
        for (int i = 0; i < MR_; ++i)
          for (int q = 0; q < 4; ++q) acc[g][i][q] = vzero();
      for (int64_t c = 0; c < chunks; ++c) {
        for (int g = 0; g < CP; ++g) {
          for (int j = 2 * (g0 + g); j < 2 * (g0 + g) + 2; ++j) {
            const uint32_t* t = tile + pair_vector(chunks, h, j, c, 0) * W;
            __m512bh wq[4];
            for (int q = 0; q < 4; ++q) wq[q] = (__m512bh)_mm512_loadu_si512(t + q * W);
            for (int i = 0; i < MR_; ++i) {
              const __m512bh xb =
                  (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(x + (m0 + i) * ldx + c * 16 + j * 4)));
              for (int q = 0; q < 4; ++q) acc[g][i][q] = _mm512_dpbf16_ps(acc[g][i][q], xb, wq[q]);
            }
          }
        }
      }
      for (int g = 0; g < CP; ++g)
        for (int i = 0; i < MR_; ++i)
          for (int q = 0; q < 4; ++q) sum[i][q] = g0 + g == 0 ? acc[g][i][q] : sum[i][q] + acc[g][i][q];
    }
    for (int i = 0; i < MR_; ++i) store_out(e, m0 + i, n0 + W * h, lane_sums(sum[i]), y);
  }
}
#endif

// y[m0:m1, n0:n0+NR] = epilogue(x8[m0:m1] . tile^T). PAIRS: x8 [M, ldx slots] in pair order (ldx
// = 16 per 32 columns); else fp32 [M, ldx = K]; zero past K; the AVX2 code: [M, ldx = K rounded
// up to 64] in k_col order, and xchain the same rows in chain order (chain_rows) where the block
// has OUTER_MIN_M rows or more (else unused). Weight rows from prefetch_n0 (the block this thread
// does next; N: none) are prefetched while the tile is made.
template <bool PAIRS, typename T>
static void gemm_block(const Weights& w, const slot_t* x8, const float* xchain, int64_t ldx, int64_t m0, int64_t m1,
                       int64_t n0, int64_t prefetch_n0, const Epilogue& e, T* y, std::vector<uint32_t>& tile) {
  // rows m0..m1 in passes of at most R rows, of nearly equal size (a pass of few rows reads the
  // whole tile for little work: 32 rows are 6+6+5+5+5+5, not 5x6+2)
  auto rows = [&](auto&& block, auto r) {
    constexpr int R = decltype(r)::value;
    const int64_t passes = (m1 - m0 + R - 1) / R, base = (m1 - m0) / passes, extra = (m1 - m0) % passes;
    for (int64_t p = 0, m = m0; p < passes; ++p) {
      const int size = (int)(base + (p < extra));
      with_rows<R>(size, [&](auto mr) { block(mr, m); });
      m += size;
    }
  };
#if DPQ_BF16
  if constexpr (PAIRS) {
    const int64_t chunks = (w.k + 31) / 32;
    tile.resize(chunks * 16 * NR);
    make_tile_pairs(w, n0, chunks, tile.data(), prefetch_n0);
    return rows([&](auto mr, int64_t m) { tile_rows_pairs<decltype(mr)::value>(tile.data(), chunks, x8, ldx, m, n0, e, y); },
                std::integral_constant<int, MRP>{});
  }
#endif
  const float* x = reinterpret_cast<const float*>(x8);
#if DPQ_AVX512
  tile.resize(NR * ((w.k + W - 1) / W * W));
  make_tile(w, n0, w.k, tile.data(), prefetch_n0);
  rows([&](auto mr, int64_t m) { tile_rows<decltype(mr)::value>(tile.data(), w.k, x, ldx, m, n0, e, y); },
       std::integral_constant<int, MR>{});
#else
  // the tile (ldx: K rounded up to 64), then its chain order or the accumulators kept between slices
  tile.resize(NR * ldx + std::max(NR * ldx, (m1 - m0) * NR * W));
  float* t = reinterpret_cast<float*>(tile.data());
  make_tile_k(w, n0, ldx, t, prefetch_n0);
  if (m1 - m0 >= OUTER_MIN_M) {
    chain_tile(t, ldx, tile.data() + NR * ldx);
    return rows([&](auto mr, int64_t m) { tile_rows_outer<decltype(mr)::value>(tile.data() + NR * ldx, ldx, xchain, m, n0, e, y); },
                std::integral_constant<int, MRO>{});
  }
  for (int64_t s = 0; s < ldx; s += KS)
    rows([&](auto mr, int64_t m) {
      tile_rows_k<decltype(mr)::value>(t, ldx, x, m, s, std::min(ldx, s + KS), t + NR * ldx + (m - m0) * NR * W, n0, e, y);
    }, std::integral_constant<int, MR>{});
#endif
}

// y[m, n] = (acc[m, n] * s_x[m]) * s_w[n] (+ bias[n]) in fp32, rounded to T (nearest even):
// numerics.w4a8_matmul's epilogue, operation for operation; columns j.. of row m (c <= W).
static inline vf out_value(const Epilogue& e, int64_t m, int64_t j, int c, vf acc) {
  vf v = (acc * vset1(e.sx[m])) * (e.sw_per_n ? vloadn(e.sw + j, c) : vset1(e.sw[0]));
  return e.bias ? v + vloadn(e.bias + j, c) : v;
}
// v rounded to bf16 (nearest even): the bf16 bits in the upper half of each 32-bit lane
static inline vi bf16_round(vf v) {
  const vi u = vcasti(v);
  return vand(vadd(u, vadd(vset1i(0x7fff), vand(vsrli(u, 16), vset1i(1)))), vset1i((int)0xffff0000u));
}

template <typename T>
static inline void store_out(const Epilogue& e, int64_t m, int64_t j, vf acc, T* y) {
  if (j >= e.n) return;
  const int c = (int)std::min<int64_t>(W, e.n - j);
  const vf v = out_value(e, m, j, c, acc);
  T* o = y + m * e.n + j;
  if constexpr (std::is_same_v<T, float>) {
    vstoren(o, v, c);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    vstoren_bf16(o, vcast(bf16_round(v)), c);
  } else {
    alignas(64) float t[W];
    vstore(t, v);
    for (int i = 0; i < c; ++i) o[i] = static_cast<T>(t[i]);
  }
}
