// gemv over rows [n0, n1), MB activation rows per weight pass; included by dpq_cpu_isa.h
// with DPQ_GEMV_BLOCK (the block kernel), DPQ_GEMV_ROWS (this function's name), DPQ_X_T.
static void DPQ_GEMV_ROWS(const Weights& w, const DPQ_X_T* x8, int64_t ldx, int64_t m, float* acc, int64_t n0,
                          int64_t n1) {
  constexpr int MB = 8;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m0 = 0;
    for (; m0 + MB <= m; m0 += MB) DPQ_GEMV_BLOCK<MB>(w, x8, ldx, m0, n, acc, w.n);
    switch (m - m0) {
      case 7: DPQ_GEMV_BLOCK<7>(w, x8, ldx, m0, n, acc, w.n); break;
      case 6: DPQ_GEMV_BLOCK<6>(w, x8, ldx, m0, n, acc, w.n); break;
      case 5: DPQ_GEMV_BLOCK<5>(w, x8, ldx, m0, n, acc, w.n); break;
      case 4: DPQ_GEMV_BLOCK<4>(w, x8, ldx, m0, n, acc, w.n); break;
      case 3: DPQ_GEMV_BLOCK<3>(w, x8, ldx, m0, n, acc, w.n); break;
      case 2: DPQ_GEMV_BLOCK<2>(w, x8, ldx, m0, n, acc, w.n); break;
      case 1: DPQ_GEMV_BLOCK<1>(w, x8, ldx, m0, n, acc, w.n); break;
      default: break;
    }
  }
}
#undef DPQ_GEMV_BLOCK
#undef DPQ_GEMV_ROWS
#undef DPQ_X_T
