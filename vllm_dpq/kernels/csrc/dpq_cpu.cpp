// The CPU backend's W4A8 kernels (vllm_dpq/kernels/cpu.py builds this at first use).
//
// INT4 codes stay resident; the FP8 weight values fp8(q * s_g) are made in registers from a
// table of the 16 chain values of each group scale (chain_table), so no full-size temporary
// exists. linear(): per block of output rows the values are written into a cache-resident tile
// in the layout of the dot-product instruction, and the kernel's own register-blocked GEMM (bf16
// pair dot products with AVX512-BF16, fp32 FMA elsewhere) sums each output over K in one order
// whatever M (batch-invariant); with AMX-BF16, from a few rows on, tdpbf16ps on AMX tiles.
// grouped_linear(): one projection of every expert of a MoE layer in one task loop; moe()
// (dpq_cpu_moe.h): the layer's routed experts, grouping to weighted sum, in one call.
// AVX-512 or AVX2 code, chosen at run time; registered as torch ops (torch.ops.vllm_dpq_cpu.*).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace {

// a 32-bit GEMM operand slot (one fp32 value or a pair of bf16 values), read from either
typedef uint32_t slot_t __attribute__((may_alias));

// make_chain_table: the 16 chain values fp8(clamp((c - 8) * s, -fp8_max, fp8_max)) (code c) of
// every bf16 value s as bf16 words (exact), indexed by s's 16 bits: [65536][16], 2 MiB. Made once per fp8_max with
// c10's fp8 conversion, the one torch (and so numerics.py) uses. Group scales are bf16 or fp8
// (both exact in bf16), so the table of a (row, group) is one load.
const uint16_t* make_chain_table(float fp8_max) {
  static std::mutex mu;
  static std::vector<std::pair<float, std::unique_ptr<uint16_t[]>>> made;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& [f, t] : made)
    if (f == fp8_max) return t.get();
  auto t = std::make_unique<uint16_t[]>(65536 * 16);
  at::parallel_for(0, 65536, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float s = c10::BFloat16(static_cast<uint16_t>(b), c10::BFloat16::from_bits());
      for (int c = 0; c < 16; ++c) {
        const float v = std::min(std::max(static_cast<float>(c - 8) * s, -fp8_max), fp8_max);
        t[b * 16 + c] = c10::BFloat16(static_cast<float>(c10::Float8_e4m3fn(v))).x;
      }
    }
  });
  made.emplace_back(fp8_max, std::move(t));
  return made.back().second.get();
}

// The same values in the AVX2 kernel's layout: per bf16 value s, the low bytes of its 16 chain
// values, then their high bytes ([65536][32] bytes, 2 MiB: two vpshufb tables per load); made
// once per fp8_max from make_chain_table, by processes that run the AVX2 code.
const uint8_t* make_split_table(float fp8_max) {
  static std::mutex mu;
  static std::vector<std::pair<float, std::unique_ptr<uint8_t[]>>> made;
  const uint16_t* chain = make_chain_table(fp8_max);
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& [f, t] : made)
    if (f == fp8_max) return t.get();
  auto t = std::make_unique<uint8_t[]>(65536 * 32);
  for (int64_t i = 0; i < 65536 * 16; ++i) {
    t[i / 16 * 32 + i % 16] = static_cast<uint8_t>(chain[i]);
    t[i / 16 * 32 + 16 + i % 16] = static_cast<uint8_t>(chain[i] >> 8);
  }
  made.emplace_back(fp8_max, std::move(t));
  return made.back().second.get();
}

// a table for every linear call: the last one this thread made, without the lock
template <typename T, const T* (*Make)(float)>
const T* last_table(float fp8_max) {
  thread_local float last_max = 0.0f;
  thread_local const T* last = nullptr;
  if (last == nullptr || last_max != fp8_max) {
    last = Make(fp8_max);
    last_max = fp8_max;
  }
  return last;
}
const uint16_t* chain_table(float fp8_max) { return last_table<uint16_t, make_chain_table>(fp8_max); }
const uint8_t* split_table(float fp8_max) { return last_table<uint8_t, make_split_table>(fp8_max); }

// the bf16 bits of every float8_e4m3fn value
const uint16_t* fp8_bf16_bits() {
  static const auto bits = [] {
    std::array<uint16_t, 256> b{};
    for (int i = 0; i < 256; ++i)
      b[i] = c10::BFloat16(static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()))).x;
    return b;
  }();
  return bits.data();
}

// one row of group scales, bf16 or fp8 as stored in the checkpoint
struct ScaleRow {
  const void* p;
  bool fp8;
  // the bf16 bits of scale g: its index in chain_table
  inline uint32_t bits(int64_t g) const {
    return fp8 ? fp8_bf16_bits()[static_cast<const uint8_t*>(p)[g]] : static_cast<const uint16_t*>(p)[g];
  }
};

struct Weights {
  const int32_t* packed;  // [n, kw]
  const void* scales;     // [n, groups]
  bool fp8_scales;
  int64_t n, k, kw, group, groups;
  const uint16_t* chain;  // chain_table(fp8_max)
  const uint8_t* split;   // split_table(fp8_max) for the AVX2 code, else null
  ScaleRow scale_row(int64_t r) const {
    const char* base = static_cast<const char*>(scales) + r * groups * (fp8_scales ? 1 : 2);
    return ScaleRow{base, fp8_scales};
  }
  // the 16 chain values of scale g of row sr, bf16 words
  const uint16_t* table(const ScaleRow& sr, int64_t g) const { return chain + 16 * sr.bits(g); }
  // the same as 16 low bytes, then 16 high bytes
  const uint8_t* split_bytes(const ScaleRow& sr, int64_t g) const { return split + 32 * sr.bits(g); }
};

// What the epilogue needs: y[m, n] = (acc * s_x[m]) * s_w[n] (+ bias[n]), rounded to y's dtype.
struct Epilogue {
  const float* sx;  // [M]
  const float* sw;  // [N] or [1]
  bool sw_per_n;
  const float* bias;  // [N] or null
  int64_t n;          // columns of y
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

// the AMX-tile GEMM where the compiler has AMX intrinsics (GCC 11+, clang 12+); elsewhere it is
// never chosen (amx_ok() is false)
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define DPQ_AMX 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")
namespace avx512bf16 {
#include "dpq_cpu_amx.h"
}  // namespace avx512bf16
#pragma GCC pop_options
#else
#define DPQ_AMX 0
namespace avx512bf16 {
constexpr int AMX_ROWS = 16;
static inline bool amx_permitted() { return false; }
static inline void amx_configure() {}
static inline void amx_release() {}
static inline int64_t amx_blocks(int64_t) { return 1; }
template <typename T>
static void gemm_block_amx(const Weights&, const slot_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           const Epilogue&, T*, std::vector<uint32_t>&) {}
}  // namespace avx512bf16
#endif

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

#define DPQ_ISA(...)                                                                  \
  do {                                                                                \
    if (isa() == Isa::avx512bf16) {                                                   \
      avx512bf16::__VA_ARGS__;                                                        \
    } else if (isa() == Isa::avx512) {                                                \
      avx512::__VA_ARGS__;                                                            \
    } else {                                                                          \
      TORCH_CHECK(isa() == Isa::avx2, "DPQ CPU kernels need AVX2 + FMA or AVX-512"); \
      avx2::__VA_ARGS__;                                                              \
    }                                                                                 \
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
                 group, groups, chain_table(static_cast<float>(fp8_max)),
                 isa() == Isa::avx2 ? split_table(static_cast<float>(fp8_max)) : nullptr};
}

// x [M, K] -> (x8 [M, ld] FP8 values in dtype (fp32 or bf16), zero beyond K, in the bf16 GEMM's
// pair order if asked; s_x fp32 [M]). A static input scale has one element, or one per row
// segment [offsets[i], offsets[i+1]) when offsets (a grouped call's experts) are given.
std::tuple<at::Tensor, at::Tensor> quantize_impl(const at::Tensor& x, const c10::optional<at::Tensor>& input_scale,
                                                 double fp8_max, int64_t ld, at::ScalarType dtype,
                                                 bool gemm_order = false,
                                                 const std::vector<int64_t>* offsets = nullptr, int64_t pad_rows = 0) {
  TORCH_CHECK(x.dim() == 2, "activations must be 2-D");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  at::Tensor x8 = at::empty({m + pad_rows, ld}, xc.options().dtype(dtype));
  if (pad_rows > 0) x8.narrow(0, m, pad_rows).zero_();
  at::Tensor sx = at::empty({m}, xc.options().dtype(at::kFloat));
  at::Tensor st;
  const float* sp = nullptr;
  const std::vector<int64_t> whole{0, m};
  const std::vector<int64_t>& segs = offsets ? *offsets : whole;
  if (input_scale.has_value()) {
    st = input_scale->to(at::kFloat).contiguous();
    TORCH_CHECK(st.numel() == (offsets ? (int64_t)segs.size() - 1 : 1),
                "static input scale must have one element (one per expert in a grouped call)");
    sp = st.data_ptr<float>();
  }
  TORCH_CHECK(xc.scalar_type() == at::kFloat || xc.scalar_type() == at::kBFloat16 || xc.scalar_type() == at::kHalf,
              "activations must be bf16, fp16 or fp32, got ", xc.scalar_type());
  float* s = sx.data_ptr<float>();
  const float fm = static_cast<float>(fp8_max);
  // a parallel region costs microseconds: rows of fewer than 2^15 values in all stay on this thread
  at::parallel_for(0, m, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(k, 1)), [&](int64_t m0, int64_t m1) {
    auto run = [&](auto* o) {
      for (size_t g = 0; g + 1 < segs.size(); ++g) {  // the row segments within [m0, m1)
        const int64_t r0 = std::max(m0, segs[g]), r1 = std::min(m1, segs[g + 1]);
        if (r0 >= r1) continue;
        const float* gs = sp ? sp + (offsets ? g : 0) : nullptr;
        switch (xc.scalar_type()) {
          case at::kFloat: DPQ_ISA(quantize_rows(xc.data_ptr<float>(), k, fm, gs, o, ld, s, r0, r1, gemm_order)); break;
          case at::kBFloat16: DPQ_ISA(quantize_rows(xc.data_ptr<c10::BFloat16>(), k, fm, gs, o, ld, s, r0, r1, gemm_order)); break;
          default: DPQ_ISA(quantize_rows(xc.data_ptr<c10::Half>(), k, fm, gs, o, ld, s, r0, r1, gemm_order));
        }
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

// FP8 values of the weights, [N, K] in dtype (float32 or bfloat16): the GEMMs' tile values made
// whole, for the tests that check them against W4A8Weights.fp8_values() (no serving path uses it)
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& group_scale, int64_t k, int64_t group,
                      double fp8_max, at::ScalarType dtype) {
  const Weights w = weights_of(packed, group_scale, k, group, fp8_max);
  at::Tensor out = at::empty({w.n, k}, packed.options().dtype(dtype));
  at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) {
    if (dtype == at::kFloat) {
      DPQ_ISA(dequant_rows(w, out.data_ptr<float>() + n0 * k, k, n0, n1));
    } else {
      TORCH_CHECK(dtype == at::kBFloat16, "dequantize to float32 or bfloat16");
      DPQ_ISA(dequant_rows(w, out.data_ptr<c10::BFloat16>() + n0 * k, k, n0, n1));
    }
  });
  return out;
}

// One GEMM of a kernel call: rows [m0, m1) of the activations times one weight set (an expert's).
struct Group {
  Weights w;
  Epilogue e;
  int64_t m0, m1;
};

// The kernel's GEMMs: fp32 FMA (lanes; the AVX2 code's order of K), bf16 pair dot products
// (pairs, AVX512-BF16) or AMX tiles (amx, dpq_cpu_amx.h)
enum class Mode { lanes, pairs, amx };

// y[m0:m1] = epilogue(x8[m0:m1] . W^T) for every group, in one parallel region: the kernel's own
// GEMM (dpq_cpu_isa.h, dpq_cpu_amx.h), FP8 weight tiles made from the INT4 codes; each output
// summed over K in one fixed order (batch-invariant).
void gemm_groups(const std::vector<Group>& groups, const slot_t* xp, const float* xchain, int64_t ldx, Mode mode,
                 at::Tensor& y) {
  constexpr int64_t MC = 1024;  // activation rows per task: its tile is made once per MC rows
  // weight rows per task: one block of NR, or on AMX from 256 activation rows amx_blocks() blocks,
  // whose tiles share each pass of activation rows (fewer, larger tasks: worth it where the rows
  // outgrow L2, not at decode sizes, where the threads want many tasks to share)
  int64_t rows = 0;
  for (const Group& g : groups) rows += g.m1 - g.m0;
  const int64_t blocks = mode == Mode::amx && rows >= 256 ? avx512bf16::amx_blocks(groups.front().w.k) : 1;
  const int64_t nr = (isa() == Isa::avx2 ? avx2::NR : avx512::NR) * blocks;
  // tasks (row chunk x block of nr weight rows) of group g: [first[g], first[g + 1])
  std::vector<int64_t> first{0};
  int64_t work = 0;
  for (const Group& g : groups) {
    const int64_t m = g.m1 - g.m0, nblocks = (g.w.n + nr - 1) / nr;
    first.push_back(first.back() + (m + MC - 1) / MC * nblocks);
    // multiply-adds, making a tile counted as ~22 per weight (0.35 cycles at 64 per cycle)
    work += nblocks * nr * g.w.k * (22 * ((m + MC - 1) / MC) + m);
  }
  const int64_t tasks = first.back();
  if (tasks == 0) return;
  // at least 2^18 multiply-adds per thread, so that small layers stay on this thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, work / tasks));
  // Tasks are taken one at a time from a shared counter, so a core slowed by other load takes
  // fewer of them instead of stalling the call; a thread takes its next task before making this
  // one's tile, whose build prefetches the next task's weights (same group only). Any thread
  // computes a task alike.
  auto locate = [&](int64_t t, int64_t& m0, int64_t& m1, int64_t& n0) -> size_t {
    const size_t g = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const int64_t local = t - first[g], nblocks = (groups[g].w.n + nr - 1) / nr;
    m0 = groups[g].m0 + local / nblocks * MC;
    m1 = std::min(groups[g].m1, m0 + MC);
    n0 = local % nblocks * nr;
    return g;
  };
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tasks, grain, [&](int64_t, int64_t) {
    thread_local std::vector<uint32_t> tile;
    if (mode == Mode::amx) avx512bf16::amx_configure();  // per thread: oneDNN's GEMMs configure their own
    for (int64_t t = next++, t_next; t < tasks; t = t_next) {
      t_next = next++;
      int64_t m0, m1, n0, pm0, pm1, pn0;
      const size_t g = locate(t, m0, m1, n0);
      const Weights& w = groups[g].w;
      const int64_t pf = t_next < tasks && locate(t_next, pm0, pm1, pn0) == g ? pn0 : w.n;  // w.n: none
      auto run = [&](auto* yp) {
        using T = std::remove_pointer_t<decltype(yp)>;
        if (mode == Mode::amx) {
          avx512bf16::gemm_block_amx<T>(w, xp, ldx, m0, m1, n0, blocks, pf, groups[g].e, yp, tile);
        } else if (mode == Mode::pairs) {
          avx512bf16::gemm_block<true, T>(w, xp, nullptr, ldx, m0, m1, n0, pf, groups[g].e, yp, tile);
        } else {
          DPQ_ISA(gemm_block<false, T>(w, xp, xchain, ldx, m0, m1, n0, pf, groups[g].e, yp, tile));
        }
      };
      switch (y.scalar_type()) {
        case at::kFloat: run(y.data_ptr<float>()); break;
        case at::kBFloat16: run(y.data_ptr<c10::BFloat16>()); break;
        default: run(y.data_ptr<c10::Half>());
      }
    }
    if (mode == Mode::amx) avx512bf16::amx_release();
  });
}

// Can this process run the AMX-tile GEMM: the avx512bf16 code, a CPU with AMX-TILE and AMX-BF16,
// and Linux's permission (asked here once)?
bool amx_ok() {
  static const bool cpu = [] {  // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE
    unsigned eax, ebx, ecx, edx;
    return DPQ_AMX && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 22 & 1) && (edx >> 24 & 1);
  }();
  return isa() == Isa::avx512bf16 && cpu && avx512bf16::amx_permitted();
}

// The kernel's GEMM for row segments [offsets[g], offsets[g+1]) of x, segment g times weight set
// g (weights[g], epilogues[g]: their s_x pointer is filled here); y in x's dtype. The GEMM:
// AMX tiles where asked (amx), else bf16 pair slots where groups are whole 32-column chunks,
// else fp32 (the same exact products); the AVX2 code's fp32 GEMM takes x in its own order of
// 64-column chunks, and in chain order too where a segment has avx2::OUTER_MIN_M rows or more.
at::Tensor gemm(const at::Tensor& x, const std::vector<int64_t>& offsets, const std::vector<Weights>& weights,
                std::vector<Epilogue> epilogues, const c10::optional<at::Tensor>& input_scale, double fp8_max,
                bool gemm_bf16, bool amx, int64_t n) {
  const int64_t k = weights.front().k;
  TORCH_CHECK(!gemm_bf16 || isa() == Isa::avx512bf16, "a bf16 GEMM needs the avx512bf16 kernel, not ", isa_name());
  TORCH_CHECK(!amx || (gemm_bf16 && amx_ok()), "the AMX GEMM needs a bf16 GEMM, the avx512bf16 kernel and a CPU "
              "with AMX-BF16 whose tiles Linux grants");
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const Mode mode = !gemm_bf16 || !avx512bf16::chunks32_ok(weights.front()) ? Mode::lanes
                    : amx                                                      ? Mode::amx
                                                                               : Mode::pairs;
  const bool bf16 = mode != Mode::lanes, lanes_k = mode == Mode::lanes && isa() == Isa::avx2;
  const int64_t ldx = bf16 ? (k + 31) / 32 * 16 : lanes_k ? (k + 63) / 64 * 64 : k;  // slots per activation row
  auto [x8, sx] = quantize_impl(x, input_scale, fp8_max, bf16 ? 2 * ldx : ldx, bf16 ? at::kBFloat16 : at::kFloat,
                                bf16 || lanes_k, offsets.size() > 2 ? &offsets : nullptr,
                                mode == Mode::amx ? avx512bf16::AMX_ROWS - 1 : 0);
  std::vector<Group> groups;
  bool outer = false;
  for (size_t g = 0; g < weights.size(); ++g) {
    if (offsets[g] == offsets[g + 1]) continue;
    epilogues[g].sx = sx.data_ptr<float>();
    groups.push_back(Group{weights[g], epilogues[g], offsets[g], offsets[g + 1]});
    outer = outer || offsets[g + 1] - offsets[g] >= avx2::OUTER_MIN_M;
  }
  at::Tensor xchain;
  if (lanes_k && outer) {
    xchain = at::empty_like(x8);
    const float* xk = x8.data_ptr<float>();
    float* xo = xchain.data_ptr<float>();
    at::parallel_for(0, x.size(0), std::max<int64_t>(1, (1 << 15) / ldx),
                     [&](int64_t m0, int64_t m1) { avx2::chain_rows(xk, ldx, xo, m0, m1); });
  }
  gemm_groups(groups, static_cast<const slot_t*>(x8.data_ptr()), xchain.defined() ? xchain.data_ptr<float>() : nullptr,
              ldx, mode, y);
  return y;
}

// y = W4A8(x [M, K], weights) in x's dtype, numerics.w4a8_matmul with fp32 accumulation: the
// kernel's own GEMM (gemm_groups), on AMX tiles from M >= amx_min_m (> 0).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& group_scale,
                  const at::Tensor& weight_scale, const c10::optional<at::Tensor>& input_scale,
                  const c10::optional<at::Tensor>& bias, int64_t k, int64_t group, double fp8_max, bool gemm_bf16,
                  int64_t amx_min_m) {
  const Weights w = weights_of(packed, group_scale, k, group, fp8_max);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "activations must be [M, ", k, "]");
  const at::Tensor sw = weight_scale.to(at::kFloat).contiguous();
  TORCH_CHECK(sw.numel() == 1 || sw.numel() == w.n, "weight scale must have 1 or N elements");
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  Epilogue e{nullptr, sw.data_ptr<float>(), sw.numel() > 1, b.has_value() ? b->data_ptr<float>() : nullptr, w.n};
  return gemm(x, {0, x.size(0)}, {w}, {e}, input_scale, fp8_max, gemm_bf16, amx_min_m > 0 && x.size(0) >= amx_min_m,
              w.n);
}

// A mixture-of-experts layer's projection in one call: rows [offsets[e], offsets[e+1]) of x (the
// tokens routed to expert e, grouped) times expert e's weights (packed [E, N, ceil(K/8)], group
// scales [E, N, ceil(K/G)], weight scales fp32 [E, 1] or [E, N], static input scales [E] or none).
// Row for row the same computation as linear() with that expert's weights and the call's M.
at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& packed,
                          const at::Tensor& group_scale, const at::Tensor& weight_scale,
                          const c10::optional<at::Tensor>& input_scale, int64_t k, int64_t group, double fp8_max,
                          bool gemm_bf16, int64_t amx_min_m) {
  TORCH_CHECK(packed.dim() == 3 && group_scale.dim() == 3 && weight_scale.dim() == 2,
              "grouped weights must be packed [E, N, K/8], group scales [E, N, G], weight scales [E, 1 or N]");
  const int64_t experts = packed.size(0), n = packed.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "activations must be [M, ", k, "]");
  const at::Tensor off = offsets.to(at::kLong).contiguous();
  TORCH_CHECK(off.numel() == experts + 1, "offsets must have E + 1 elements");
  std::vector<int64_t> o(off.data_ptr<int64_t>(), off.data_ptr<int64_t>() + experts + 1);
  TORCH_CHECK(o.front() == 0 && o.back() == x.size(0) && std::is_sorted(o.begin(), o.end()),
              "offsets must rise from 0 to the number of rows");
  const at::Tensor sw = weight_scale.to(at::kFloat).contiguous();
  TORCH_CHECK(sw.size(0) == experts && (sw.size(1) == 1 || sw.size(1) == n), "weight scales must be [E, 1 or N]");
  std::vector<Weights> weights;
  std::vector<Epilogue> epilogues;
  for (int64_t e = 0; e < experts; ++e) {
    weights.push_back(weights_of(packed[e], group_scale[e], k, group, fp8_max));
    epilogues.push_back(Epilogue{nullptr, sw.data_ptr<float>() + e * sw.size(1), sw.size(1) > 1, nullptr, n});
  }
  return gemm(x.contiguous(), o, weights, epilogues, input_scale, fp8_max, gemm_bf16,
              amx_min_m > 0 && x.size(0) >= amx_min_m, n);
}

#include "dpq_cpu_moe.h"

}  // namespace

TORCH_LIBRARY(vllm_dpq_cpu, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor group_scale, Tensor weight_scale, Tensor? input_scale, "
        "Tensor? bias, int k, int group, float fp8_max, bool gemm_bf16, int amx_min_m) -> Tensor");
  m.def("grouped_linear(Tensor x, Tensor offsets, Tensor packed, Tensor group_scale, Tensor weight_scale, "
        "Tensor? input_scale, int k, int group, float fp8_max, bool gemm_bf16, int amx_min_m) -> Tensor");
  m.def("moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13_packed, Tensor w13_group_scale, "
        "Tensor w13_weight_scale, Tensor? w13_input_scale, int w13_group, Tensor w2_packed, Tensor w2_group_scale, "
        "Tensor w2_weight_scale, Tensor? w2_input_scale, int w2_group, float fp8_max, bool gemm_bf16, "
        "int amx_min_m) -> Tensor");
  m.def("quantize(Tensor x, Tensor? input_scale, float fp8_max) -> (Tensor, Tensor)");
  m.def("dequantize(Tensor packed, Tensor group_scale, int k, int group, float fp8_max, ScalarType dtype) -> Tensor");
  m.def("isa() -> str", &isa_name);
  m.def("amx() -> bool", &amx_ok);
  m.def("use_isa(str name) -> str", &use_isa);
}

TORCH_LIBRARY_IMPL(vllm_dpq_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("grouped_linear", &grouped_linear);
  m.impl("moe", &moe);
  m.impl("quantize", &quantize);
  m.impl("dequantize", &dequantize);
}
