// The CPU backend's W4A8 kernels (vllm_dpq/kernels/cpu.py builds this at first use).
//
// INT4 codes stay resident; the FP8 weight values fp8(q * s_g) are made in registers: per
// (row, group) a 16-entry table of the chain values (one permute per W columns), so no
// full-size temporary exists. Small M: fused dequantize + dot products, fp32 FMA. Larger M:
// the weights are dequantized once per call (one pass, to the GEMM dtype) and multiplied by
// torch's GEMM (oneDNN / MKL), bit-identical to numerics.w4a8_matmul. AVX-512 or AVX2 code,
// chosen at run time; registered as torch ops (torch.ops.vllm_dpq_cpu.*).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace {

// one row of group scales, bf16 or fp8 as stored in the checkpoint
struct ScaleRow {
  const void* p;
  bool fp8;
  inline float at(int64_t g) const {
    return fp8 ? static_cast<float>(static_cast<const c10::Float8_e4m3fn*>(p)[g])
               : static_cast<float>(static_cast<const c10::BFloat16*>(p)[g]);
  }
};

struct Weights {
  const int32_t* packed;  // [n, kw]
  const void* scales;     // [n, groups]
  bool fp8_scales;
  int64_t n, k, kw, group, groups;
  float fp8_max;
  ScaleRow scale_row(int64_t r) const {
    const char* base = static_cast<const char*>(scales) + r * groups * (fp8_scales ? 1 : 2);
    return ScaleRow{base, fp8_scales};
  }
};

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")
namespace avx512bf16 {
#define DPQ_AVX512 1
#define DPQ_BF16 1
#include "dpq_cpu_isa.h"
#undef DPQ_AVX512
#undef DPQ_BF16
}  // namespace avx512bf16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
namespace avx512 {
#define DPQ_AVX512 1
#define DPQ_BF16 0
#include "dpq_cpu_isa.h"
#undef DPQ_AVX512
#undef DPQ_BF16
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define DPQ_AVX512 0
#define DPQ_BF16 0
#include "dpq_cpu_isa.h"
#undef DPQ_AVX512
#undef DPQ_BF16
}  // namespace avx2
#pragma GCC pop_options

namespace {

enum class Isa { none, avx2, avx512, avx512bf16 };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::avx512bf16 : Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx2;
  return Isa::none;
}

Isa& current() {
  static Isa v = detect();
  return v;
}

Isa isa() { return current(); }

int64_t lanes() { return isa() == Isa::avx2 ? 8 : 16; }

std::string name_of(Isa v) {
  switch (v) {
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "none";
  }
}

std::string isa_name() { return name_of(isa()); }

// use a lower ISA's code (tests every path on one machine); returns the previous ISA
std::string use_isa(const std::string& name) {
  const std::string before = isa_name();
  const Isa best = detect();
  for (Isa v : {Isa::avx2, Isa::avx512, Isa::avx512bf16}) {
    if (name == name_of(v)) {
      TORCH_CHECK(best != Isa::none && v <= best, "ISA ", name, " is not available on this CPU (best: ",
                  name_of(best), ")");
      current() = v;
      return before;
    }
  }
  TORCH_CHECK(false, "unknown ISA ", name, " (avx2, avx512, avx512bf16)");
}

#define DPQ_ISA(call)                                   \
  do {                                                  \
    if (isa() == Isa::avx512bf16) {                     \
      avx512bf16::call;                                 \
    } else if (isa() == Isa::avx512) {                  \
      avx512::call;                                     \
    } else {                                            \
      TORCH_CHECK(isa() == Isa::avx2, "DPQ CPU kernels need AVX2 + FMA or AVX-512"); \
      avx2::call;                                       \
    }                                                   \
  } while (0)

Weights weights_of(const at::Tensor& packed, const at::Tensor& group_scale, int64_t k, int64_t group,
                   double fp8_max) {
  TORCH_CHECK(packed.dtype() == at::kInt && packed.dim() == 2 && packed.is_contiguous(),
              "packed weight must be contiguous int32 [N, ceil(K/8)]");
  TORCH_CHECK(packed.size(1) == (k + 7) / 8, "packed weight has ", packed.size(1), " columns, K=", k, " needs ",
              (k + 7) / 8);
  TORCH_CHECK(group > 0, "group size must be positive");
  const int64_t groups = (k + group - 1) / group;
  TORCH_CHECK(group_scale.dim() == 2 && group_scale.size(0) == packed.size(0) && group_scale.size(1) == groups &&
                  group_scale.is_contiguous(),
              "group scales must be contiguous [N, ceil(K/G)]");
  const bool fp8 = group_scale.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || group_scale.scalar_type() == at::kBFloat16, "group scales must be bf16 or float8_e4m3fn");
  return Weights{packed.data_ptr<int32_t>(), group_scale.data_ptr(), fp8, packed.size(0), k, packed.size(1),
                 group, groups, static_cast<float>(fp8_max)};
}

// x [M, K] -> (x8 fp32 [M, ld] FP8 values, zero beyond K; s_x fp32 [M])
// x [M, K] -> (x8 [M, ld] FP8 values in dtype (fp32 or bf16), zero beyond K; s_x fp32 [M])
std::tuple<at::Tensor, at::Tensor> quantize_impl(const at::Tensor& x, const c10::optional<at::Tensor>& input_scale,
                                                 double fp8_max, int64_t ld, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2, "activations must be 2-D");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  at::Tensor x8 = at::empty({m, ld}, xc.options().dtype(dtype));
  at::Tensor sx = at::empty({m}, xc.options().dtype(at::kFloat));
  at::Tensor st;
  const float* sp = nullptr;
  if (input_scale.has_value()) {
    st = input_scale->to(at::kFloat).contiguous();
    TORCH_CHECK(st.numel() == 1, "static input scale must have one element");
    sp = st.data_ptr<float>();
  }
  TORCH_CHECK(xc.scalar_type() == at::kFloat || xc.scalar_type() == at::kBFloat16 || xc.scalar_type() == at::kHalf,
              "activations must be bf16, fp16 or fp32, got ", xc.scalar_type());
  float* s = sx.data_ptr<float>();
  const float fm = static_cast<float>(fp8_max);
  at::parallel_for(0, m, 1, [&](int64_t m0, int64_t m1) {
    auto run = [&](auto* o) {
      switch (xc.scalar_type()) {
        case at::kFloat: DPQ_ISA(quantize_rows(xc.data_ptr<float>(), k, fm, sp, o, ld, s, m0, m1)); break;
        case at::kBFloat16: DPQ_ISA(quantize_rows(xc.data_ptr<c10::BFloat16>(), k, fm, sp, o, ld, s, m0, m1)); break;
        default: DPQ_ISA(quantize_rows(xc.data_ptr<c10::Half>(), k, fm, sp, o, ld, s, m0, m1));
      }
    };
    if (dtype == at::kFloat) {
      run(x8.data_ptr<float>());
    } else {
      run(x8.data_ptr<c10::BFloat16>());
    }
  });
  return {x8, sx};
}

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, const c10::optional<at::Tensor>& input_scale,
                                            double fp8_max) {
  auto [x8, sx] = quantize_impl(x, input_scale, fp8_max, x.size(1), at::kFloat);
  return {x8, sx.unsqueeze(1)};
}

// FP8 values of the weights, [N, K] in dtype (float32 or bfloat16)
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& group_scale, int64_t k, int64_t group,
                      double fp8_max, at::ScalarType dtype) {
  const Weights w = weights_of(packed, group_scale, k, group, fp8_max);
  at::Tensor out = at::empty({w.n, k}, packed.options().dtype(dtype));
  at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) {
    if (dtype == at::kFloat) {
      DPQ_ISA(dequant_rows(w, out.data_ptr<float>(), n0, n1));
    } else {
      TORCH_CHECK(dtype == at::kBFloat16, "dequantize to float32 or bfloat16");
      DPQ_ISA(dequant_rows(w, out.data_ptr<c10::BFloat16>(), n0, n1));
    }
  });
  return out;
}

template <typename A>
void epilogue(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw, const c10::optional<at::Tensor>& b,
              at::Tensor& y) {
  const int64_t m = acc.size(0), n = acc.size(1);
  const A* a = acc.data_ptr<A>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  const bool per_n = sw.numel() > 1;
  at::parallel_for(0, m, 1, [&](int64_t m0, int64_t m1) {
    switch (y.scalar_type()) {
      case at::kFloat:
        DPQ_ISA(epilogue_rows(a, sx.data_ptr<float>(), sw.data_ptr<float>(), per_n, bp, y.data_ptr<float>(), n, m0, m1));
        break;
      case at::kBFloat16:
        DPQ_ISA(epilogue_rows(a, sx.data_ptr<float>(), sw.data_ptr<float>(), per_n, bp,
                              y.data_ptr<c10::BFloat16>(), n, m0, m1));
        break;
      default:
        DPQ_ISA(epilogue_rows(a, sx.data_ptr<float>(), sw.data_ptr<float>(), per_n, bp, y.data_ptr<c10::Half>(),
                              n, m0, m1));
    }
  });
}

// y = W4A8(x [M, K], weights) in x's dtype: numerics.w4a8_matmul. M <= fused_max_m: fused
// kernel (fp32 FMA; the sum order differs from torch's GEMM); else dequantize + torch GEMM in
// bf16 (gemm_bf16) or fp32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& group_scale,
                  const at::Tensor& weight_scale, const c10::optional<at::Tensor>& input_scale,
                  const c10::optional<at::Tensor>& bias, int64_t k, int64_t group, double fp8_max, bool gemm_bf16,
                  int64_t fused_max_m) {
  const Weights w = weights_of(packed, group_scale, k, group, fp8_max);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "activations must be [M, ", k, "]");
  const int64_t m = x.size(0);
  const at::Tensor sw = weight_scale.to(at::kFloat).contiguous();
  TORCH_CHECK(sw.numel() == 1 || sw.numel() == w.n, "weight scale must have 1 or N elements");
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, w.n}, x.options());
  if (m == 0) return y;
  if (m <= fused_max_m) {
    at::Tensor acc = at::empty({m, w.n}, x.options().dtype(at::kFloat));
    float* ap = acc.data_ptr<float>();
    at::Tensor sx;
    if (isa() == Isa::avx512bf16 && avx512bf16::chunks32_ok(w)) {
      const int64_t ld = (k + 31) / 32 * 32;
      at::Tensor x8;
      std::tie(x8, sx) = quantize_impl(x, input_scale, fp8_max, ld, at::kBFloat16);
      const uint16_t* xp = reinterpret_cast<const uint16_t*>(x8.data_ptr<c10::BFloat16>());
      at::parallel_for(0, w.n, 8, [&](int64_t n0, int64_t n1) { avx512bf16::gemv_rows_bf16(w, xp, ld, m, ap, n0, n1); });
    } else {
      const int64_t ld = (k + lanes() - 1) / lanes() * lanes();
      at::Tensor x8;
      std::tie(x8, sx) = quantize_impl(x, input_scale, fp8_max, ld, at::kFloat);
      const float* xp = x8.data_ptr<float>();
      at::parallel_for(0, w.n, 8, [&](int64_t n0, int64_t n1) { DPQ_ISA(gemv_rows(w, xp, ld, m, ap, n0, n1)); });
    }
    epilogue<float>(acc, sx, sw, b, y);
    return y;
  }
  const at::ScalarType dt = gemm_bf16 ? at::kBFloat16 : at::kFloat;
  auto [x8, sx] = quantize_impl(x, input_scale, fp8_max, k, dt);
  at::Tensor acc = at::mm(x8, dequantize(packed, group_scale, k, group, fp8_max, dt).t());
  if (gemm_bf16) {
    epilogue<c10::BFloat16>(acc, sx, sw, b, y);
  } else {
    epilogue<float>(acc, sx, sw, b, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(vllm_dpq_cpu, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor group_scale, Tensor weight_scale, Tensor? input_scale, "
        "Tensor? bias, int k, int group, float fp8_max, bool gemm_bf16, int fused_max_m) -> Tensor");
  m.def("quantize(Tensor x, Tensor? input_scale, float fp8_max) -> (Tensor, Tensor)");
  m.def("dequantize(Tensor packed, Tensor group_scale, int k, int group, float fp8_max, ScalarType dtype) -> Tensor");
  m.def("isa() -> str", &isa_name);
  m.def("use_isa(str name) -> str", &use_isa);
}

TORCH_LIBRARY_IMPL(vllm_dpq_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("quantize", &quantize);
  m.impl("dequantize", &dequantize);
}
