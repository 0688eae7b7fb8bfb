// The AVX2 code's fp32 GEMM, included by dpq_cpu_isa.h (DPQ_AVX512 = 0) inside the avx2
// namespace, after the shared pieces it uses (Prefetch, NR, transpose, store_out, k_col).

// -- fp32 (AVX2): a tile [NR][K rounded up to 64] of fp32 values, lanes over K (each 64-column
// chunk in k_col order, as the activations are stored), and a dot-product GEMM: accumulators of
// one activation row and one weight row each, lane l summing the row's slots l + 8i in order, then
// the 8 lanes added in a fixed tree (hsum4). No transposition; the values are made with byte
// shuffles: a 64-column chunk of a row is 32 bytes of codes (even columns in the low nibbles),
// and vpshufb through the two 16-byte tables of each 128-bit lane's group (the low and the high
// bytes of its 16 chain values, split_table) gives the bf16 values, two to a 32-bit slot, whose
// fp32 values are a shift or a mask away. Groups that are not whole 32-column lanes (rare): one
// value at a time. Perf of the transposing form this replaced: the build was bound by shuffles
// (permutes, blends, the 8 x 8 transpose) with its tables spilled, about 1 ns per weight.
constexpr int MR = 3;  // activation rows per pass: 3 x 4 accumulators + 3 x + 1 weight of 16 registers

static void make_tile_k(const Weights& w, int64_t n0, int64_t ld, float* tile, int64_t prefetch_n0) {
  const int64_t chunks = ld / 64;
  Prefetch next(w, prefetch_n0, NR * chunks);
  const int32_t* row[NR];
  ScaleRow sr[NR];
  for (int i = 0; i < NR; ++i) {
    const int64_t n = std::min(n0 + i, w.n - 1);
    row[i] = w.packed + n * w.kw;
    sr[i] = w.scale_row(n);
  }
  if (w.groups > 1 && w.group % 32 != 0) {
    for (int i = 0; i < NR; ++i)
      for (int64_t p = 0; p < ld; ++p) {
        const int64_t col = std::min(p / 64 * 64 + k_col(p % 64), w.k - 1);
        const uint32_t code = (row[i][col / 8] >> (4 * (col % 8))) & 15;
        tile[i * ld + p] = c10::BFloat16(w.table(sr[i], col / w.group)[code], c10::BFloat16::from_bits());
      }
    return;
  }
  const int64_t lanes_per_group = w.groups == 1 ? 0 : w.group / 32;  // 0: one group
  const __m256i nibble = _mm256_set1_epi8(15), high = _mm256_set1_epi32((int)0xffff0000u);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t g0 = lanes_per_group ? std::min(2 * c / lanes_per_group, w.groups - 1) : 0;
    const int64_t g1 = lanes_per_group ? std::min((2 * c + 1) / lanes_per_group, w.groups - 1) : 0;
    const int nw = (int)std::min<int64_t>(8, w.kw - 8 * c);
    for (int i = 0; i < NR; ++i) {
      next.step();
      const __m256i v = nw == 8 ? _mm256_loadu_si256((const __m256i*)(row[i] + 8 * c))
                                : _mm256_maskload_epi32(row[i] + 8 * c, tail_mask(nw));
      const uint8_t *t0 = w.split_bytes(sr[i], g0), *t1 = w.split_bytes(sr[i], g1);
      const __m256i lo = _mm256_loadu2_m128i((const __m128i*)t1, (const __m128i*)t0);
      const __m256i hi = _mm256_loadu2_m128i((const __m128i*)(t1 + 16), (const __m128i*)(t0 + 16));
      const __m256i even = _mm256_and_si256(v, nibble), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      const __m256i el = _mm256_shuffle_epi8(lo, even), eh = _mm256_shuffle_epi8(hi, even);
      const __m256i ol = _mm256_shuffle_epi8(lo, odd), oh = _mm256_shuffle_epi8(hi, odd);
      const __m256i words[4] = {_mm256_unpacklo_epi8(el, eh), _mm256_unpackhi_epi8(el, eh),
                                _mm256_unpacklo_epi8(ol, oh), _mm256_unpackhi_epi8(ol, oh)};
      float* o = tile + i * ld + 64 * c;
      for (int q = 0; q < 4; ++q) {
        _mm256_storeu_si256((__m256i*)(o + 16 * q), _mm256_slli_epi32(words[q], 16));
        _mm256_storeu_si256((__m256i*)(o + 16 * q + 8), _mm256_and_si256(words[q], high));
      }
    }
  }
}

// the sums of the 8 lanes of a0..a3: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) each
static inline __m128 hsum4(vf a0, vf a1, vf a2, vf a3) {
  const vf h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Slots [s0, s1) of y[m0:m0+MR_, n0:n0+NR] from the tile [NR][ld]; x [M, ld] in k_col order, zero
// past K. The GEMM goes over K in slices of KS slots, each over all the activation rows, so that
// the tile's slice stays in L1 (perf at M = 256, K = 1536: the unsliced loop waited on 7 streams
// from L2); the accumulators wait in acc (MR_ x NR vectors) between slices: the same sums. Weight
// rows NB at a time: MR_ x NB accumulators (8 or 12), each lane summing every 8th slot in order.
constexpr int64_t KS = 256;
template <int MR_, typename T>
static inline void tile_rows_k(const float* tile, int64_t ld, const float* x, int64_t m0, int64_t s0, int64_t s1,
                               float* keep, int64_t n0, const Epilogue& e, T* y) {
  constexpr int NB = MR_ == 1 ? 8 : 4;
  alignas(32) float sum[MR_][NR];
  const float* xr = x + m0 * ld;
  for (int nb = 0; nb < NR; nb += NB) {
    vf acc[MR_][NB];
    for (int i = 0; i < MR_; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = s0 == 0 ? vzero() : vload(keep + (i * NR + nb + j) * W);
    const float* t = tile + nb * ld;
#pragma GCC unroll 4  // unrolled: a few % faster at M = 8-32 on an AVX2-only EPYC (RESULTS)
    for (int64_t p = s0; p < s1; p += W) {
      vf xv[MR_];
      for (int i = 0; i < MR_; ++i) xv[i] = vload(xr + i * ld + p);
      for (int j = 0; j < NB; ++j) {
        const vf wv = vload(t + j * ld + p);
        for (int i = 0; i < MR_; ++i) acc[i][j] = vfma(xv[i], wv, acc[i][j]);
      }
    }
    for (int i = 0; i < MR_; ++i)
      for (int j = 0; j < NB; j += 4) {
        if (s1 < ld) {
          for (int u = j; u < j + 4; ++u) vstore(keep + (i * NR + nb + u) * W, acc[i][u]);
        } else {
          _mm_store_ps(sum[i] + nb + j, hsum4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]));
        }
      }
  }
  if (s1 < ld) return;
  for (int i = 0; i < MR_; ++i) {
    store_out(e, m0 + i, n0, vload(sum[i]), y);
    store_out(e, m0 + i, n0 + W, vload(sum[i] + W), y);
  }
}

// From OUTER_MIN_M activation rows, the same sums with lanes over N: the tile transposed to chain
// order (out[(l * ld / 8 + j) * NR + n] = tile[n][8j + l]: chain l, the dot form's lane l, is one
// contiguous run), MRO rows x 2 vectors of accumulators (a broadcast of x per slot instead of a
// vector load per row and weight row), one chain at a time, the 8 chains added in hsum4's tree:
// the same bits as tile_rows_k, so the form M picks does not change a row's output. The
// activations come in chain order too (chain_rows, once per call): each pass over a chain reads
// its rows' runs whole instead of every eighth value of them (1.1x at M = 1024 on an AVX2-only
// EPYC, RESULTS).
constexpr int MRO = 6;  // 12 accumulators + 2 weight vectors + 1 broadcast of 16 registers
// OUTER_MIN_M, tuned (forced AVX2, one thread, SmolLM2's shapes summed, 9-13 runs): the dot form
// is 1.10x this one at M = 32, a tie at 48 (1.02x), 0.97x at 64, 0.88-0.95x from 96 to 256.
constexpr int64_t OUTER_MIN_M = 64;  // below: the dot form
// rows [m0, m1) of x [M, ld] (k_col order, ld a multiple of 64) in chain order:
// out[m * ld + l * ld / 8 + j] = x[m * ld + 8j + l]
static void chain_rows(const float* x, int64_t ld, float* out, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t p = 0; p < ld; p += W * W) {
      vi r[W];
      for (int j = 0; j < W; ++j) r[j] = vcasti(vload(x + m * ld + p + W * j));
      transpose(r);
      for (int l = 0; l < W; ++l) vstore(out + m * ld + l * (ld / W) + p / W, vcast(r[l]));
    }
}
static void chain_tile(const float* tile, int64_t ld, uint32_t* out) {
  for (int h = 0; h < NR; h += W)
    for (int64_t p = 0; p < ld; p += W) {
      vi r[W];
      for (int i = 0; i < W; ++i) r[i] = vcasti(vload(tile + (h + i) * ld + p));
      transpose(r);
      for (int l = 0; l < W; ++l) vstorei(out + (l * (ld / W) + p / W) * NR + h, r[l]);
    }
}
template <int MR_, typename T>
static inline void tile_rows_outer(const uint32_t* tile, int64_t ld, const float* xchain, int64_t m0, int64_t n0,
                                   const Epilogue& e, T* y) {
  vf part[3][MR_][2];  // ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7))
  for (int l = 0; l < W; ++l) {
    vf acc[MR_][2];
    for (int i = 0; i < MR_; ++i) acc[i][0] = acc[i][1] = vzero();
    const uint32_t* t = tile + l * (ld / W) * NR;
    const float* xr = xchain + m0 * ld + l * (ld / W);
#pragma GCC unroll 8  // unrolled: 1.02-1.1x from M = 64 on an AVX2-only EPYC (RESULTS)
    for (int64_t j = 0; j < ld / W; ++j, t += NR) {
      const vf w0 = vcast(vloadi(t)), w1 = vcast(vloadi(t + W));
      for (int i = 0; i < MR_; ++i) {
        const vf xb = vset1(xr[i * ld + j]);
        acc[i][0] = vfma(xb, w0, acc[i][0]);
        acc[i][1] = vfma(xb, w1, acc[i][1]);
      }
    }
    const int d = l < 4 ? l / 2 : l / 2 - 1;
    for (int i = 0; i < MR_; ++i)
      for (int h = 0; h < 2; ++h) {
        part[d][i][h] = l % 2 == 0 ? acc[i][h] : part[d][i][h] + acc[i][h];
        if (l % 4 == 3) part[l / 4][i][h] = part[l / 4][i][h] + part[l / 4 + 1][i][h];
      }
  }
  for (int i = 0; i < MR_; ++i) {
    store_out(e, m0 + i, n0, part[0][i][0] + part[1][i][0], y);
    store_out(e, m0 + i, n0 + W, part[0][i][1] + part[1][i][1], y);
  }
}
