// The AMX-tile GEMM (included by dpq_cpu.cpp inside namespace avx512bf16, compiled for AMX-TILE
// and AMX-BF16 besides): the FP8 weight values of NR = 32 rows made into a cache-resident tile
// in the VNNI layout of tdpbf16ps (per 32 columns of K: two B tiles of 16 column pairs x 16 rows),
// the activations' FP8 values read in place as A tiles (bf16, row stride ld), fp32 accumulator
// tiles. tdpbf16ps multiplies bf16 pairs exactly (FP8 x FP8 products are exact in fp32) and
// adds them to each output in the tile's pair order, chunk after chunk; each output row depends
// only on its own activation row,
// so a row's result does not depend on M, on its position in a tile, on the block or the
// thread (batch-invariant, as the vector GEMMs are), though its sum order is not theirs.

constexpr int AMX_ROWS = 16;  // rows of an A tile; the activations carry AMX_ROWS - 1 zero rows after the last

// Linux gives a process the AMX tile state only when asked (once; all its threads)
static inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// palette 1: tiles 0-3 accumulators (16 x 16 fp32), 4-5 activations, 6-7 weights (16 x 64 bytes);
// in static memory (GCC drops stores to a stack copy that only ldtilecfg reads)
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static const TileConfig amx_config = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};
static inline void amx_configure() { _tile_loadconfig(&amx_config); }
static inline void amx_release() { _tile_release(); }

// The tile of weight rows [n0, n0 + NR), `chunks` chunks of 32 columns: per chunk, the slot sets
// of the four quads of a half (Quad, as make_tile_pairs makes them), each set transposed in its
// 128-bit lanes: B tile h of chunk c at tile + (2c + h) * 256 words, its row 4j + s holding pair
// slot s of set j (the activations' pair order, quantize_rows' gemm_order) of rows n0 + 16h ..
// n0 + 16h + 15, in row order.
static void make_tile_amx(const Weights& w, int64_t n0, int64_t chunks, uint32_t* tile, int64_t prefetch_n0) {
  Prefetch next(w, prefetch_n0, 2 * chunks);
  for (int h = 0; h < 2; ++h) {
    Quad quads[4] = {Quad(w, n0, h, 0, chunks), Quad(w, n0, h, 1, chunks), Quad(w, n0, h, 2, chunks),
                     Quad(w, n0, h, 3, chunks)};
    for (int64_t c = 0; c < chunks; ++c) {
      next.step();
      __m512i a[4][4];  // [quad][set]: lane r of quad q holds row q + 4r
      for (int q = 0; q < 4; ++q) quads[q].chunk(w, c, a[q]);
      uint32_t* o = tile + (2 * c + h) * AMX_ROWS * W;
      for (int j = 0; j < 4; ++j, o += 4 * W) {
        const vi t0 = vunpack32(a[0][j], a[1][j], false), t1 = vunpack32(a[0][j], a[1][j], true);
        const vi t2 = vunpack32(a[2][j], a[3][j], false), t3 = vunpack32(a[2][j], a[3][j], true);
        vstorei(o, vunpack64(t0, t2, false));
        vstorei(o + W, vunpack64(t0, t2, true));
        vstorei(o + 2 * W, vunpack64(t1, t3, false));
        vstorei(o + 3 * W, vunpack64(t1, t3, true));
      }
    }
  }
}

// store_out of columns [j, j + 2W) of row m from two accumulators: a bf16 row segment within n
// (64 bytes) with one store, not two masked halves
template <typename T>
static inline void store_out_line(const Epilogue& e, int64_t m, int64_t j, vf lo, vf hi, T* y) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (j + 2 * W <= e.n) {
      const __m512i upper = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                                             25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
      const vi a = bf16_round(out_value(e, m, j, W, lo)), b = bf16_round(out_value(e, m, j + W, W, hi));
      _mm512_storeu_si512(y + m * e.n + j, _mm512_permutex2var_epi16(a, upper, b));
      return;
    }
  }
  store_out(e, m, j, lo, y);
  store_out(e, m, j + W, hi, y);
}

// The accumulators of the passes (up to 2 AMX_ROWS activation rows x NR columns each) stored from
// the tiles and waiting for their epilogue. A vector load of what a tile store wrote waits until
// the store reaches the cache, which is after every tile product before it, so a pass's epilogue
// runs LAG passes later, a few rows per chunk of K, while the tiles compute.
struct AmxOut {
  static constexpr int LAG = 2, BUFS = LAG + 1;
  alignas(64) float acc[BUFS][4][AMX_ROWS][W];  // [pass % BUFS][tile][row][column]
  int64_t m[BUFS], rows[BUFS], n0[BUFS];
  int64_t stored = 0, flushed = 0, done = 0;  // passes stored, passes through the epilogue, rows done of the next

  // rows [done, until) of pass `flushed` through the epilogue into y
  template <typename T>
  void flush(int64_t until, const Epilogue& e, T* y) {
    const int b = flushed % BUFS;
    for (until = std::min(until, rows[b]); done < until; ++done) {
      const int t = 2 * (done / AMX_ROWS), r = done % AMX_ROWS;
      store_out_line(e, m[b] + done, n0[b], vload(acc[b][t][r]), vload(acc[b][t + 1][r]), y);
    }
    if (done == rows[b]) ++flushed, done = 0;
  }
  template <typename T>
  void finish(const Epilogue& e, T* y) {
    while (flushed < stored) flush(rows[flushed % BUFS], e, y);
  }
};

// y[m, m + rows) (rows <= 2 AMX_ROWS), columns [n0, n0 + NR), from the tile; x: FP8 values as bf16
// pairs in pair order, ldx slots a row, zero past K; AMX_ROWS - 1 readable rows after the last
// (their results are not stored). This pass's epilogue is left to out, which runs the one LAG
// passes back meanwhile.
template <bool TWO, typename T>
static inline void amx_rows(const uint32_t* tile, int64_t chunks, const slot_t* x, int64_t ldx, int64_t m, int64_t rows,
                            int64_t n0, const Epilogue& e, T* y, AmxOut& out) {
  const char* a = reinterpret_cast<const char*>(x + m * ldx);
  const int64_t stride = 4 * ldx;
  const int64_t due = out.stored - out.flushed >= AmxOut::LAG ? out.flushed : -1;  // the pass to flush meanwhile
  const int64_t per_chunk = due < 0 ? 0 : (out.rows[due % AmxOut::BUFS] + chunks - 1) / chunks;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, a + 64 * c, stride);
    _tile_loadd(6, tile + 2 * c * AMX_ROWS * W, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, tile + (2 * c + 1) * AMX_ROWS * W, 64);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (TWO) {
      _tile_loadd(5, a + AMX_ROWS * stride + 64 * c, stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    if (out.flushed == due) out.flush(out.done + per_chunk, e, y);
  }
  const int b = out.stored++ % AmxOut::BUFS;
  out.m[b] = m, out.rows[b] = rows, out.n0[b] = n0;
  _tile_stored(0, out.acc[b][0], 64);
  _tile_stored(1, out.acc[b][1], 64);
  if constexpr (TWO) {
    _tile_stored(2, out.acc[b][2], 64);
    _tile_stored(3, out.acc[b][3], 64);
  }
}

// Blocks of NR weight rows per task: as many as keep their tiles (2 KiB per 32 columns of K each)
// within 1 MiB, at most 4, so that each pass of activation rows, read once into L2, serves them all
static inline int64_t amx_blocks(int64_t k) {
  return std::clamp<int64_t>((int64_t(1) << 20) / ((k + 31) / 32 * 2 * AMX_ROWS * W * 4), 1, 4);
}

// y[m0:m1, n0:n0 + blocks NR] = epilogue(x8[m0:m1] . tiles^T) on AMX tiles (the caller has
// configured them; groups whole 32-column chunks, or one group: chunks32_ok): the blocks' tiles,
// then per pass of activation rows each block in turn
template <typename T>
static void gemm_block_amx(const Weights& w, const slot_t* x8, int64_t ldx, int64_t m0, int64_t m1, int64_t n0,
                           int64_t blocks, int64_t prefetch_n0, const Epilogue& e, T* y, std::vector<uint32_t>& tile) {
  const int64_t chunks = (w.k + 31) / 32, size = chunks * 2 * AMX_ROWS * W;
  blocks = std::min(blocks, (w.n - n0 + NR - 1) / NR);
  tile.resize(blocks * size);
  for (int64_t b = 0; b < blocks; ++b)
    make_tile_amx(w, n0 + b * NR, chunks, tile.data() + b * size, b + 1 < blocks ? n0 + (b + 1) * NR : prefetch_n0);
  AmxOut out;
  for (int64_t m = m0; m < m1; m += 2 * AMX_ROWS) {
    const int64_t rows = std::min<int64_t>(2 * AMX_ROWS, m1 - m);
    for (int64_t b = 0; b < blocks; ++b) {
      if (rows > AMX_ROWS) {
        amx_rows<true>(tile.data() + b * size, chunks, x8, ldx, m, rows, n0 + b * NR, e, y, out);
      } else {
        amx_rows<false>(tile.data() + b * size, chunks, x8, ldx, m, rows, n0 + b * NR, e, y, out);
      }
    }
  }
  out.finish(e, y);
}
