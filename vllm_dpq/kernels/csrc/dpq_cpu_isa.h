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
struct Lut { vf lo, hi; };  // the chain values of codes 0..7 and 8..15, fp32
static inline vf bf16x8(const uint16_t* t) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)t)), 16));
}
static inline Lut load_lut(const uint16_t* t) { return Lut{bf16x8(t), bf16x8(t + 8)}; }
static inline vf lookup(const Lut& t, vi idx) {
  vf a = _mm256_permutevar8x32_ps(t.lo, idx), b = _mm256_permutevar8x32_ps(t.hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
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

#if DPQ_AVX512
// 32-column chunks with the FP8 values as bf16 words (exact), by one 16-bit permute per chunk;
// for groups that are multiples of 32 columns, or one group.
static inline bool chunks32_ok(const Weights& w) { return w.group % 32 == 0 || w.groups == 1; }

// the 32 codes of words 4c..4c+3 of a packed row as 16-bit words
static inline __m512i codes32(const int32_t* row, int nw) {
  const __m128i b = nw >= 4 ? _mm_loadu_si128((const __m128i*)row) : _mm_maskz_loadu_epi32((__mmask8)((1u << nw) - 1), row);
  const __m512i word = _mm512_set_epi16(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1,
                                        0, 0, 0, 0);
  const __m512i shift = _mm512_set_epi16(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12,
                                         8, 4, 0, 12, 8, 4, 0);
  return _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi16(word, _mm512_castsi128_si512(b)), shift),
                          _mm512_set1_epi16(15));
}

static inline __mmask32 mask32(int64_t cols) { return cols >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << cols) - 1); }
#endif

// The FP8 weight values of W rows [n0, n0 + W) (rows past N repeat the last row), chunk by
// chunk in order: chunk c of row i in r[i], lanes over K. PAIRS (AVX-512, chunks32_ok): 32
// columns per chunk as bf16 words (W 32-bit slots of pairs); else W columns as fp32. Past K:
// finite values of no meaning. Each row's table of the 16 chain values is loaded when the chunks
// enter a new group; groups that are not a multiple of the chunk (rare): a table per lane.
template <bool PAIRS>
struct RowBlock {
  static constexpr int COLS = PAIRS ? 32 : W;  // columns per chunk
  const Weights& w;
  const int32_t* row[W];
  ScaleRow sr[W];
  int64_t per_group, end = 0, g = -1;  // chunks per group (0: not a multiple of COLS); current group
#if DPQ_AVX512
  using Table = std::conditional_t<PAIRS, const uint16_t*, Lut>;  // PAIRS: read by the permute itself
#else
  using Table = Lut;
#endif
  Table lut[W];

  RowBlock(const Weights& w_, int64_t n0) : w(w_) {
    for (int i = 0; i < W; ++i) {
      const int64_t n = std::min(n0 + i, w.n - 1);
      row[i] = w.packed + n * w.kw;
      sr[i] = w.scale_row(n);
    }
    per_group = w.groups == 1 ? (w.k + COLS - 1) / COLS : w.group % COLS == 0 ? w.group / COLS : 0;
  }

  void chunk(int64_t c, vi r[W]) {
    const int words = COLS / 8, nw = (int)std::min<int64_t>(words, w.kw - c * words);
    if (per_group == 0) {  // a table per lane (not PAIRS: chunks32_ok)
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
#if DPQ_AVX512
      if constexpr (PAIRS) {
        for (int i = 0; i < W; ++i) lut[i] = w.table(sr[i], g);
      } else
#endif
      {
        for (int i = 0; i < W; ++i) lut[i] = load_lut(w.table(sr[i], g));
      }
    }
#if DPQ_AVX512
    if constexpr (PAIRS) {
      for (int i = 0; i < W; ++i) r[i] = _mm512_permutexvar_epi16(codes32(row[i] + 4 * c, nw), _mm512_loadu_si512(lut[i]));
    } else
#endif
    {
      for (int i = 0; i < W; ++i) r[i] = vcasti(lookup(lut[i], codes(row[i] + c * WORDS, nw)));
    }
  }
};

// Dequantize rows [n0, n1) to out (row n at out + (n - n0) * ld; fp32 or bf16: FP8 values are
// exact in both).
template <typename T>
static void dequant_rows(const Weights& w, T* out, int64_t ld, int64_t n0, int64_t n1) {
  auto run = [&](auto block) {
    constexpr int COLS = decltype(block)::COLS;
    for (int64_t b = n0; b < n1; b += W) {
      decltype(block) rb(w, b);
      vi r[W];
      for (int64_t c = 0; c * COLS < w.k; ++c) {
        rb.chunk(c, r);
        const int cols = (int)std::min<int64_t>(COLS, w.k - c * COLS);
        for (int i = 0; i < W && b + i < n1; ++i) {
          T* o = out + (b + i - n0) * ld + c * COLS;
#if DPQ_AVX512
          if constexpr (COLS == 32) {
            _mm512_mask_storeu_epi16(o, mask32(cols), r[i]);
            continue;
          }
#endif
          if constexpr (std::is_same_v<T, float>) {
            vstoren(o, vcast(r[i]), cols);
          } else {
            vstoren_bf16(o, vcast(r[i]), cols);
          }
        }
      }
    }
  };
#if DPQ_AVX512
  if (std::is_same_v<T, c10::BFloat16> && chunks32_ok(w)) return run(RowBlock<true>(w, n0));
#endif
  run(RowBlock<false>(w, n0));
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

// ---- The GEMM (every M): the FP8 values of a block of NR = 2W weight rows are made W rows at
// a time (RowBlock, lanes over K), transposed in registers into a tile [slots][NR] of 32-bit
// slots, then multiplied by MR activation rows at a time into 2 * MR vector accumulators (lanes
// over N), the epilogue applied in registers. A slot is one fp32 value (fp32 FMA) or, with
// AVX512-BF16, a pair of bf16 values of columns 2p, 2p + 1 (vdpbf16ps: both exact products
// added in fp32). Every output is summed over its slots in order, one after another, whatever
// M, the block or the thread: the result of a row does not depend on the rows it is computed with.
constexpr int NR = 2 * W;
#if DPQ_AVX512
constexpr int MR = 12;  // 24 accumulators + 2 weight vectors + 1 broadcast of 32 registers
static inline vi vunpack32(vi a, vi b, bool hi) { return hi ? _mm512_unpackhi_epi32(a, b) : _mm512_unpacklo_epi32(a, b); }
static inline vi vunpack64(vi a, vi b, bool hi) { return hi ? _mm512_unpackhi_epi64(a, b) : _mm512_unpacklo_epi64(a, b); }
#else
constexpr int MR = 6;  // 12 accumulators + 2 weight vectors + 1 broadcast of 16 registers
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

// The tile of weight rows [n0, n0 + NR): tile[slot][NR] (slots rounded up to W), one chunk of W
// rows (W slots each) transposed in registers; PAIRS: bf16 pair slots, else fp32 slots.
template <bool PAIRS>
static void make_tile(const Weights& w, int64_t n0, int64_t slots, uint32_t* tile) {
  for (int h = 0; h < NR; h += W) {
    RowBlock<PAIRS> rb(w, n0 + h);
    vi r[W];
    for (int64_t s = 0, c = 0; s < slots; s += W, ++c) {
      rb.chunk(c, r);
      transpose(r);
      for (int i = 0; i < W; ++i) vstorei(tile + (s + i) * NR + h, r[i]);
    }
  }
}

template <typename T>
static inline void store_out(const Epilogue& e, int64_t m, int64_t j, vf acc, T* y);

// acc[i][h] += the product of activation slot xr[i * ldx + p] and the tile's slot p (rows h * W..)
template <int MR_, bool BF16>
static inline void slot_step(const uint32_t* tile, const slot_t* xr, int64_t ldx, int64_t p, vf acc[MR_][2]) {
  const vi w0 = vloadi(tile + p * NR), w1 = vloadi(tile + p * NR + W);
  for (int i = 0; i < MR_; ++i) {
#if DPQ_BF16
    if constexpr (BF16) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xr[i * ldx + p]);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xb, (__m512bh)w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xb, (__m512bh)w1);
      continue;
    }
#endif
    const vf xb = vset1(reinterpret_cast<const float*>(xr)[i * ldx + p]);
    acc[i][0] = vfma(xb, vcast(w0), acc[i][0]);
    acc[i][1] = vfma(xb, vcast(w1), acc[i][1]);
  }
}

// MR_ activation rows from m0 against the tile of columns [n0, n0 + NR); BF16: pair slots. Each
// output is the sum of CHAINS partial sums, chain c over slots c, c + CHAINS, ... in order, added
// in chain order: independent chains keep the multiply units busy when MR_ is small. CP chains run
// at a time (all where the accumulators fit in registers); the sums are the same whatever CP.
constexpr int CHAINS = 4;
template <int MR_, bool BF16, typename T>
static inline void tile_rows(const uint32_t* tile, int64_t slots, const slot_t* x, int64_t ldx, int64_t m0,
                             int64_t n0, const Epilogue& e, T* y) {
  constexpr int CP = MR_ * 4 <= MR ? 4 : MR_ * 2 <= MR ? 2 : 1;
  const slot_t* xr = x + m0 * ldx;
  vf sum[MR_][2];
  for (int c0 = 0; c0 < CHAINS; c0 += CP) {
    vf acc[CP][MR_][2];
    for (int c = 0; c < CP; ++c)
      for (int i = 0; i < MR_; ++i) acc[c][i][0] = acc[c][i][1] = vzero();
    int64_t p = c0;
    for (; p + CHAINS <= slots + c0; p += CHAINS)
      for (int c = 0; c < CP; ++c) slot_step<MR_, BF16>(tile, xr, ldx, p + c, acc[c]);
    for (int c = 0; c < CP && p + c < slots; ++c) slot_step<MR_, BF16>(tile, xr, ldx, p + c, acc[c]);
    for (int c = 0; c < CP; ++c)
      for (int i = 0; i < MR_; ++i)
        for (int h = 0; h < 2; ++h) sum[i][h] = c0 + c == 0 ? acc[c][i][h] : sum[i][h] + acc[c][i][h];
  }
  for (int i = 0; i < MR_; ++i) {
    store_out(e, m0 + i, n0, sum[i][0], y);
    store_out(e, m0 + i, n0 + W, sum[i][1], y);
  }
}

template <int MR_, bool BF16, typename T>
static inline void tile_rows_tail(int rows, const uint32_t* tile, int64_t slots, const slot_t* x, int64_t ldx,
                                  int64_t m0, int64_t n0, const Epilogue& e, T* y) {
  if (rows == MR_) {
    tile_rows<MR_, BF16>(tile, slots, x, ldx, m0, n0, e, y);
  } else if constexpr (MR_ > 1) {
    tile_rows_tail<MR_ - 1, BF16>(rows, tile, slots, x, ldx, m0, n0, e, y);
  }
}

// y[m0:m1, n0:n0+NR] = epilogue(x8[m0:m1] . tile^T); x8 [M, ldx slots], zero past K.
template <bool BF16, typename T>
static void gemm_block(const Weights& w, const slot_t* x8, int64_t ldx, int64_t m0, int64_t m1, int64_t n0,
                       const Epilogue& e, T* y, std::vector<uint32_t>& tile) {
  const int64_t slots = BF16 ? (w.k + 1) / 2 : w.k;
  tile.resize(NR * ((slots + W - 1) / W * W));
  make_tile<BF16>(w, n0, slots, tile.data());
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile_rows<MR, BF16>(tile.data(), slots, x8, ldx, m, n0, e, y);
  if (m < m1) tile_rows_tail<MR - 1, BF16>((int)(m1 - m), tile.data(), slots, x8, ldx, m, n0, e, y);
}

// y[m, n] = (acc[m, n] * s_x[m]) * s_w[n] (+ bias[n]) in fp32, rounded to T (nearest even):
// numerics.w4a8_matmul's epilogue, operation for operation; columns j.. of row m (W or fewer).
template <typename T>
static inline void store_out(const Epilogue& e, int64_t m, int64_t j, vf acc, T* y) {
  if (j >= e.n) return;
  const int c = (int)std::min<int64_t>(W, e.n - j);
  vf v = (acc * vset1(e.sx[m])) * (e.sw_per_n ? vloadn(e.sw + j, c) : vset1(e.sw[0]));
  if (e.bias) v = v + vloadn(e.bias + j, c);
  T* o = y + m * e.n + j;
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

// The epilogue over a GEMM result acc [M, N] (A: float or bf16), rows [m0, m1).
template <typename A, typename T>
static void epilogue_rows(const A* acc, const Epilogue& e, T* y, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t j = 0; j < e.n; j += W) store_out(e, m, j, load_x(acc + m * e.n + j, (int)std::min<int64_t>(W, e.n - j)), y);
}
