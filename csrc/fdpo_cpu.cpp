// CPU implementations of fdiv_kernels::fdpo_forward / fdpo_backward (schemas in ops.cpp), the kernel contract of
// docs/spec.md. The divergence math, the per-pair head and its epilogue come from fdpo_math.h, shared with the CUDA
// kernels.
//
// Forward: one pass over the inputs.
//   * Work item = (pair p, chunk c of kChunk elements of D). The chunking is FIXED (independent of the thread
//     count), items run in parallel (at::parallel_for) and each writes its partial sums to its own workspace slot:
//       S = sum m (pred - t)^2,  R = sum m (ref - t)^2,  Q = sum m (ref - pred)(ref + pred - 2t),  M = sum m
//     for the winner and the loser row of its pair. Both rows of a pair are processed by the same item, so a
//     shared [B, D] target (and mask) row is read once. With cross_term (no mask) the item also sums the pair's
//     cross term x = sum (pred_w - t)(pred_l - t) into its own slot of a second workspace (variants compiled
//     apart: the default ones do not carry the extra accumulator).
//   * Inside an item: 8 float lanes (4 double lanes for fp64) accumulate blocks of kBlock elements; each block's
//     lanes are flushed into double lanes; the chunk's lanes are summed in lane order. Fixed order everywhere.
//   * Then, serially and in a fixed order: chunk partials -> per-row sums (double) -> fdpo_pair_head<float>
//     (<double> for fp64 inputs) per pair -> the reduced loss (and X = the sum of the pairs' cross terms, in
//     double, into summary[3]). Same inputs, same bits, for any thread count.
// Backward: one elementwise pass over (pair, chunk) items: grad = grad_coef[row] * G[pair] * m * (pred - target)
//   in model_pred's dtype, with the shared target row read once per pair. Large fp32/fp64 gradients are written
//   with non-temporal stores (kStreamMinBytes). Where an overflowed coefficient is +-inf (forward_kl / alpha /
//   hellinger past exp's range), a scalar path gives 0 instead of inf * 0 = NaN where pred == target or m == 0.
//
// Vectorization. The inner loops are written on GCC vector extensions (8 x float = one AVX register) and compiled
// twice from fdpo_cpu_kernels.h: a generic copy for the baseline ISA the
// extension is built for (x86-64: SSE2, so the built package runs on any x86-64 machine) and, on x86-64 with GCC,
// a copy under `#pragma GCC target("avx2,fma,f16c")` that uses F16C for fp16 and AVX2 for bf16 conversions. The
// AVX2 copy is chosen at run time when the CPU has AVX2+FMA+F16C (env FDIV_KERNELS_CPU_ISA=generic forces the
// generic copy, for tests). The two copies agree to fp32 rounding (FMA contraction), not bitwise; on one machine
// results are bitwise reproducible for any thread count. All indexing is int64_t.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "fdpo_math.h"
#include "fdpo_op.h"
#include "static_switch.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define FDPO_CPU_HAVE_AVX2_COPY 1  // GCC: compiled under #pragma GCC target, chosen at run time
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FDPO_CPU_HAVE_AVX2_COPY 1  // other compilers: only when the whole build targets AVX2 (-march=native)
#else
#define FDPO_CPU_HAVE_AVX2_COPY 0
#endif

namespace fdpo_cpu {

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// 8 double lanes, flushed from 8 float lanes (two AVX registers; a struct keeps GCC from spilling a 64-byte vector).
struct Wide8 {
  f64x4 lo, hi;
};

// Element-type tags of the kernels (fp16/bf16 are handled as raw 16-bit words), per storage dtype.
struct F32 {
  using S = float;
};
struct F64 {
  using S = double;
};
struct BF16 {
  using S = uint16_t;
};
struct F16 {
  using S = uint16_t;
};
using Dtype = at::ScalarType;  // float32, float64, bfloat16 or float16 (dtype_of refuses the others)
template <typename T>
struct TagOf;
template <>
struct TagOf<float> {
  using type = F32;
};
template <>
struct TagOf<double> {
  using type = F64;
};
template <>
struct TagOf<at::BFloat16> {
  using type = BF16;
};
template <>
struct TagOf<at::Half> {
  using type = F16;
};

constexpr int64_t kChunk = 4096;  // elements of D per work item (fixed: results do not depend on thread count)
constexpr int64_t kBlock = 1024;  // elements accumulated in float lanes before a flush into double lanes
constexpr int kSlots = 8;         // workspace doubles per item: S, R, Q, M of the winner, then of the loser
// Gradients of at least this many bytes are written with non-temporal (streaming) stores: a fresh multi-MB output
// is not in cache, and a plain store first reads every line it writes (read-for-ownership), an extra pass.
// Measured on the 2-core Xeon (Sapphire Rapids) dev machine, full fwd+bwd step: fp32 1.06-1.33x faster at 1 thread
// and up to 2.1x at 2 threads (SD1.5 to video shapes). fp16/bf16 gradients are written with plain stores: their
// 16-byte streaming stores (four per cache line) gained at most 1.04x on that machine one day and were 5-6x
// SLOWER on it another (a [16, 4M] bf16 backward: 230-250 ms streaming, 35-45 ms plain, 2026-11-30), a risk
// not worth that gain. Env FDIV_KERNELS_CPU_STREAM_STORES=0 / 1 forces streaming off / on (when rows are aligned
// to the vector width), for any dtype.
constexpr int64_t kStreamMinBytes = int64_t(1) << 20;

struct FwdArgs {
  Dtype dtype;  // model_pred's; the other inputs may each have their own (mixed precision, see forward_mixed)
  Dtype ref_dtype, target_dtype, mask_dtype;
  const void* pred;
  const void* ref;  // nullptr: ref_err path
  const void* target;
  const void* mask;  // nullptr: no mask
  int64_t D, B, chunks;
  bool target_shared, mask_shared, interleaved;
  double* ws;        // [B * chunks * kSlots]
  bool cross;        // cross_term: also sum (pred_w - t_w)(pred_l - t_l) per item (never with a mask)
  double* cross_ws;  // [B * chunks] when cross, else nullptr
  bool mixed() const {
    return target_dtype != dtype || (ref != nullptr && ref_dtype != dtype) || (mask != nullptr && mask_dtype != dtype);
  }
};

struct BwdArgs {
  Dtype dtype;  // model_pred's and the gradient's
  Dtype target_dtype, mask_dtype;
  const void* pred;
  const void* target;
  const void* mask;
  void* grad;
  int64_t D, B, chunks;
  bool target_shared, mask_shared, interleaved;
  bool stream_stores;   // non-temporal stores of the gradient (rows aligned to the vector width, large output)
  const double* scale;  // [2B]: grad_coef[row] * G[pair(row)]
  bool mixed() const { return target_dtype != dtype || (mask != nullptr && mask_dtype != dtype); }
};

// Rows of pair p and the rows of a [2B] or shared [B] target/mask they read.
using fdpo::loser_row;
using fdpo::pair_of_row;
using fdpo::winner_row;

using fdpo::bool_switch;

// The layout variants of a call (fdpo::layout_switch): f(mask, shared_target, shared_mask) as std::true_type /
// std::false_type arguments. Every kernel family dispatches through this.
template <typename Args, typename F>
inline void layout_switch(const Args& a, F&& f) {
  fdpo::layout_switch(a.mask != nullptr, a.target_shared, a.mask_shared, f);
}

// Run f(Tag{}) with the kernels' tag for the storage dtype.
template <typename F>
inline void dtype_switch(Dtype dtype, F&& f) {
  fdpo::storage_switch</*kAllowDouble=*/true>(
      dtype, "cpu", [&](auto type) { f(typename TagOf<typename decltype(type)::type>::type{}); });
}

namespace generic {
#define FDPO_CPU_AVX2 0
#include "fdpo_cpu_kernels.h"
#undef FDPO_CPU_AVX2
}  // namespace generic

#if FDPO_CPU_HAVE_AVX2_COPY
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
#define FDPO_CPU_AVX2 1
#include "fdpo_cpu_kernels.h"
#undef FDPO_CPU_AVX2
}  // namespace avx2
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
#endif

// The ISA copy to run: AVX2 where the CPU has it (and the env does not say otherwise).
inline bool use_avx2() {
#if FDPO_CPU_HAVE_AVX2_COPY
  static const bool cpu_has = [] {
#if defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return true;
#endif
  }();
  const char* env = std::getenv("FDIV_KERNELS_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "generic") == 0) return false;
  return cpu_has;
#else
  return false;
#endif
}

inline void run_forward_items(const FwdArgs& a) {
#if FDPO_CPU_HAVE_AVX2_COPY
  if (use_avx2()) return avx2::forward_items(a);
#endif
  generic::forward_items(a);
}

inline void run_backward_items(const BwdArgs& a, bool overflow_safe) {
#if FDPO_CPU_HAVE_AVX2_COPY
  if (use_avx2()) {
    if (a.mixed()) return avx2::backward_items_mixed(a);
    return overflow_safe ? avx2::backward_items_safe(a) : avx2::backward_items(a);
  }
#endif
  if (a.mixed()) return generic::backward_items_mixed(a);
  overflow_safe ? generic::backward_items_safe(a) : generic::backward_items(a);
}

Dtype dtype_of(const at::Tensor& t) {
  const Dtype dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "fdiv_kernels (cpu): unsupported dtype ", dt, "; expected float32, float16, bfloat16 or float64");
  return dt;
}

template <typename T>
void pair_heads(const fdpo::HeadParams& hp, const FwdArgs& a, bool has_ref, const T* ref_err, const T* pair_weight,
                const fdpo::PairOutputs<T>& out, T* summary) {
  const int64_t B = a.B, nc = a.chunks;
  const bool has_mask = a.mask != nullptr;
  const double inv_d = 1.0 / static_cast<double>(a.D);
  double total = 0.0, wins = 0.0, e_total = 0.0, eref_total = 0.0, cross = 0.0;
  for (int64_t p = 0; p < B; ++p) {
    if (a.cross) {
      double x = 0.0;  // chunks in order, then pairs in order
      for (int64_t c = 0; c < nc; ++c) x += a.cross_ws[p * nc + c];
      cross += x;
    }
    double sums[kSlots] = {0, 0, 0, 0, 0, 0, 0, 0};  // S, R, Q, M of the winner, then of the loser
    const double* ws = a.ws + p * nc * kSlots;
    for (int64_t c = 0; c < nc; ++c)
      for (int k = 0; k < kSlots; ++k) sums[k] += ws[c * kSlots + k];
    const int64_t rw = winner_row(p, B, a.interleaved), rl = loser_row(p, B, a.interleaved);
    const auto errors = [&](const double* s, int64_t row) {
      const double scale = fdpo::error_scale(hp.err_reduction, has_mask, s[3], inv_d);
      return fdpo::sample_errors<T>(s[0], s[1], s[2], scale, has_ref, has_ref ? T(0) : ref_err[row]);
    };
    const fdpo::SampleErrors<T> ew = errors(sums, rw), el = errors(sums + 4, rl);
    const T w = pair_weight != nullptr ? pair_weight[p] : T(1);
    const fdpo::PairHead<T> h = fdpo::pair_epilogue<T>(hp, p, rw, rl, ew, el, w, out);
    total += static_cast<double>(h.loss);
    wins += static_cast<double>(fdpo::implicit_win(h.logit, hp.strict_ties));
    e_total += static_cast<double>(ew.e) + static_cast<double>(el.e);
    eref_total += static_cast<double>(ew.e_ref) + static_cast<double>(el.e_ref);
  }
  fdpo::store_reduced(hp, total, wins, e_total, eref_total, cross, out.loss, summary);
}

fdpo::ForwardOutputs forward_cpu(const at::Tensor& model_pred, const std::optional<at::Tensor>& ref_pred,
                                 const at::Tensor& target, const std::optional<at::Tensor>& ref_err,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& pair_weight,
                                 c10::ArrayRef<double> fparams, c10::ArrayRef<int64_t> iparams) {
  TORCH_CHECK(model_pred.device().is_cpu(), "fdiv_kernels (cpu): model_pred must be a CPU tensor");
  fdpo::check_reference("cpu", ref_pred.has_value(), ref_err.has_value());
  const fdpo::RowViews v = fdpo::row_views("cpu", /*allow_double=*/true, model_pred, ref_pred, target, mask);
  const int64_t B = v.B, D = v.D, rows = 2 * B;
  const fdpo::HeadParams hp = fdpo::head_params("cpu", fparams, iparams, B);
  fdpo::check_cross_term("cpu", hp, v.mask.defined());
  const Dtype dt = dtype_of(v.pred);
  const at::ScalarType acc = fdpo::accumulate_type(dt);
  at::Tensor rerr, pw;
  if (ref_err.has_value()) rerr = fdpo::small_vector(*ref_err, model_pred, acc, rows, "cpu", "ref_err");
  if (pair_weight.has_value()) pw = fdpo::small_vector(*pair_weight, model_pred, acc, B, "cpu", "pair_weight");
  const at::Tensor &pred = v.pred, &ref = v.ref, &tgt = v.target, &msk = v.mask;

  const int64_t chunks = (D + kChunk - 1) / kChunk;
  std::vector<double> ws(static_cast<size_t>(B * chunks * kSlots), 0.0);
  std::vector<double> cross_ws(hp.cross_term ? static_cast<size_t>(B * chunks) : 0, 0.0);
  FwdArgs a;
  a.dtype = dt;
  a.ref_dtype = ref.defined() ? dtype_of(ref) : dt;
  a.target_dtype = dtype_of(tgt);
  a.mask_dtype = msk.defined() ? dtype_of(msk) : dt;
  a.pred = pred.data_ptr();
  a.ref = ref.defined() ? ref.data_ptr() : nullptr;
  a.target = tgt.data_ptr();
  a.mask = msk.defined() ? msk.data_ptr() : nullptr;
  a.D = D;
  a.B = B;
  a.chunks = chunks;
  a.target_shared = tgt.size(0) == B;
  a.mask_shared = msk.defined() && msk.size(0) == B;
  a.interleaved = hp.interleaved;
  a.ws = ws.data();
  a.cross = hp.cross_term;
  a.cross_ws = hp.cross_term ? cross_ws.data() : nullptr;
  run_forward_items(a);

  fdpo::ForwardOutputs out = fdpo::empty_forward_outputs(pred, hp.reduction);
  auto& [loss, logits, stats, summary, coef] = out;
  const auto heads = [&](auto zero) {
    using T = decltype(zero);
    const fdpo::PairOutputs<T> po{loss.data_ptr<T>(), logits.data_ptr<T>(), stats.data_ptr<T>(), coef.data_ptr<T>()};
    pair_heads<T>(hp, a, ref.defined(), rerr.defined() ? rerr.data_ptr<T>() : nullptr,
                  pw.defined() ? pw.data_ptr<T>() : nullptr, po, summary.data_ptr<T>());
  };
  if (acc == at::kDouble)
    heads(0.0);
  else
    heads(0.0f);
  return out;
}

// A multi-MB gradient is fresh memory from mmap: every 4 KiB page faults on first touch, and on the VMs measured
// here those faults cost about as much as writing the data. Asking for transparent huge pages (THP "madvise"
// mode, a common default) makes it one fault per 2 MiB. Best effort: a kernel without THP ignores the advice.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

at::Tensor backward_cpu(const at::Tensor& grad_loss, const at::Tensor& model_pred, const at::Tensor& target,
                        const std::optional<at::Tensor>& mask, const at::Tensor& grad_coef, bool interleaved) {
  TORCH_CHECK(model_pred.device().is_cpu(), "fdiv_kernels (cpu): model_pred must be a CPU tensor");
  const fdpo::RowViews v = fdpo::row_views("cpu", /*allow_double=*/true, model_pred, std::nullopt, target, mask);
  const int64_t B = v.B, D = v.D, rows = 2 * B;
  const at::Tensor &pred = v.pred, &tgt = v.target, &msk = v.mask;
  const Dtype dt = dtype_of(pred);
  TORCH_CHECK(grad_loss.numel() == 1 || grad_loss.numel() == B, "fdiv_kernels (cpu): grad_loss must have 1 or B = ", B,
              " elements; got ", grad_loss.numel());
  const at::Tensor g = grad_loss.to(at::kCPU, at::kDouble).contiguous().reshape({-1});
  const at::Tensor cf = fdpo::small_vector(grad_coef, model_pred, fdpo::accumulate_type(dt), rows, "cpu", "grad_coef");
  // Per-row scale coef * G, rounded to the accumulate type as the product in that type would be; 0 where either
  // factor is 0 (an overflowed coefficient times a zero upstream gradient is 0, not NaN).
  std::vector<double> scale(static_cast<size_t>(rows));
  const double* gp = g.data_ptr<double>();
  const bool per_pair = grad_loss.dim() == 1 && grad_loss.numel() == B;
  bool all_finite = true;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = pair_of_row(i, B, interleaved);
    const double G = per_pair ? gp[p] : gp[0];
    if (cf.scalar_type() == at::kDouble) {
      scale[i] = fdpo::mul0(cf.data_ptr<double>()[i], G);
    } else {
      scale[i] = static_cast<double>(fdpo::mul0(cf.data_ptr<float>()[i], static_cast<float>(G)));
    }
    all_finite = all_finite && std::isfinite(scale[i]);
  }
  at::Tensor grad = at::empty_like(pred);
  advise_huge_pages(grad.data_ptr(), grad.numel() * pred.element_size());
  BwdArgs a;
  a.dtype = dt;
  a.target_dtype = dtype_of(tgt);
  a.mask_dtype = msk.defined() ? dtype_of(msk) : dt;
  a.pred = pred.data_ptr();
  a.target = tgt.data_ptr();
  a.mask = msk.defined() ? msk.data_ptr() : nullptr;
  a.grad = grad.data_ptr();
  a.D = D;
  a.B = B;
  a.chunks = (D + kChunk - 1) / kChunk;
  a.target_shared = tgt.size(0) == B;
  a.mask_shared = msk.defined() && msk.size(0) == B;
  a.interleaved = interleaved;
  a.scale = scale.data();
  {
    const int64_t vec_bytes = (dt == at::kFloat || dt == at::kDouble) ? 32 : 16;  // bytes of one stored vector
    const bool aligned = reinterpret_cast<uintptr_t>(a.grad) % vec_bytes == 0 &&
                         (D * static_cast<int64_t>(pred.element_size())) % vec_bytes == 0;
    const char* env = std::getenv("FDIV_KERNELS_CPU_STREAM_STORES");
    const bool want = env != nullptr && env[0] != '\0'
                          ? std::strcmp(env, "0") != 0
                          : pred.element_size() >= 4 && grad.numel() * pred.element_size() >= kStreamMinBytes;
    a.stream_stores = aligned && want;
  }
  // An overflowed (+-inf) coefficient (forward_kl/alpha/hellinger past exp's range, see docs/architecture.md)
  // takes the slower path that gives 0, not NaN, where pred == target or the mask is 0.
  if (D > 0) run_backward_items(a, !all_finite);
  return grad.view(model_pred.sizes());
}

}  // namespace fdpo_cpu

// Which ISA copy the CPU kernels run right now ("avx2" or "generic"), for tests and benchmark records:
// fdiv_kernels::cpu_isa (defined in ops.cpp).
std::string fdpo_cpu_isa() { return fdpo_cpu::use_avx2() ? "avx2" : "generic"; }

TORCH_LIBRARY_IMPL(fdiv_kernels, CPU, m) {
  m.impl("fdpo_forward", &fdpo_cpu::forward_cpu);
  m.impl("fdpo_backward", &fdpo_cpu::backward_cpu);
}
