// A mixture-of-experts layer's routed experts in one call (included by dpq_cpu.cpp after
// grouped_linear, inside its anonymous namespace): what DPQMoEMethod computed with a dozen torch
// ops around two grouped_linear calls, with the same rounding points, so every output has the
// same bits:
//
//   rows        the (token, slot) pairs grouped by expert, in (token, slot) order within an
//               expert (a stable counting sort of topk_ids); the rows of x gathered in that order
//   gate_up     grouped_linear(rows, w13): [R, 2I] in x's dtype
//   a           silu(gate) * up in x's dtype (torch's own silu and mul: its bits)
//   y           grouped_linear(a, w2): [R, H] in x's dtype
//   out[t]      0 + sum over t's slots, by ascending expert, of fp32(y[row]) * fp32(weight), in
//               fp32 (the order of index_add_ over the grouped rows), rounded to x's dtype
//
// Each row is computed as its own expert's linear() computes it, and each token's output from
// its own rows only: batch-invariant, as the kernel is.

// out = the routed experts of x [T, H] (topk_ids, topk_weights [T, k]); w13: gate rows then up
// rows ([E, 2I, ...]), w2: down ([E, H, ...]); group sizes are the effective ones (K per channel).
at::Tensor moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
               const at::Tensor& w13_packed, const at::Tensor& w13_group_scale, const at::Tensor& w13_weight_scale,
               const c10::optional<at::Tensor>& w13_input_scale, int64_t w13_group, const at::Tensor& w2_packed,
               const at::Tensor& w2_group_scale, const at::Tensor& w2_weight_scale,
               const c10::optional<at::Tensor>& w2_input_scale, int64_t w2_group, double fp8_max, bool gemm_bf16,
               int64_t amx_min_m) {
  TORCH_CHECK(x.dim() == 2, "activations must be 2-D [T, H]");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_weights.sizes() == topk_ids.sizes(),
              "topk_ids and topk_weights must be [T, top_k]");
  TORCH_CHECK(w13_packed.dim() == 3 && w2_packed.dim() == 3 && w13_packed.size(1) % 2 == 0,
              "expert weights must be w13 [E, 2I, ...] and w2 [E, H, ...]");
  const int64_t tokens = x.size(0), h = x.size(1), top_k = topk_ids.size(1), experts = w13_packed.size(0);
  const int64_t i = w13_packed.size(1) / 2, rows = tokens * top_k;
  TORCH_CHECK(w2_packed.size(0) == experts && w2_packed.size(1) == h, "w2 must be [E, H, ...]");
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  // the stable counting sort: offsets [E + 1], row r holds pair order[r]; row_of[pair] its row
  std::vector<int64_t> offsets(experts + 1, 0), order(rows), row_of(rows);
  for (int64_t p = 0; p < rows; ++p) {
    TORCH_CHECK(id[p] >= 0 && id[p] < experts, "expert id ", id[p], " out of range [0, ", experts, ")");
    ++offsets[id[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) offsets[e + 1] += offsets[e];
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t p = 0; p < rows; ++p) {
      row_of[p] = fill[id[p]]++;
      order[row_of[p]] = p;
    }
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor xs = at::empty({rows, h}, xc.options());
  const size_t row_bytes = h * xc.element_size();
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(static_cast<char*>(xs.data_ptr()) + r * row_bytes,
                static_cast<const char*>(xc.data_ptr()) + order[r] / top_k * row_bytes, row_bytes);
  const at::Tensor off = at::tensor(offsets, xc.options().dtype(at::kLong));
  const at::Tensor gate_up =
      grouped_linear(xs, off, w13_packed, w13_group_scale, w13_weight_scale, w13_input_scale, h, w13_group, fp8_max,
                     gemm_bf16, amx_min_m);
  at::Tensor a = at::silu(gate_up.narrow(1, 0, i));
  a.mul_(gate_up.narrow(1, i, i));
  const at::Tensor y = grouped_linear(a, off, w2_packed, w2_group_scale, w2_weight_scale, w2_input_scale, i, w2_group,
                                      fp8_max, gemm_bf16, amx_min_m)
                           .to(at::kFloat);
  at::Tensor out = at::empty({tokens, h}, xc.options().dtype(at::kFloat));
  const float* yp = y.data_ptr<float>();
  const float* wp = wts.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // on this thread: a few multiply-adds per output, less than a parallel region costs (and a
  // region waits for its slowest thread, which other load on the machine may have descheduled)
  std::vector<int64_t> slots(top_k);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t s = 0; s < top_k; ++s) slots[s] = t * top_k + s;
    std::sort(slots.begin(), slots.end(), [&](int64_t a, int64_t b) { return row_of[a] < row_of[b]; });
    float* o = op + t * h;
    std::fill(o, o + h, 0.0f);
    for (int64_t p : slots) {
      const float* yr = yp + row_of[p] * h;
      const float w = wp[p];
      for (int64_t j = 0; j < h; ++j) o[j] += yr[j] * w;
    }
  }
  return out.to(xc.scalar_type());
}
