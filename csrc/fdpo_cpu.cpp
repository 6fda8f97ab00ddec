// CPU implementations of fdiv_kernels_C::forward / fdiv_kernels_C::backward (schemas in ops.cpp), the kernel
// contract of docs/architecture.md. The divergence math and the per-pair head come from fdpo_math.h, shared with
// the CUDA kernels.
//
// Forward: one pass over the inputs.
//   * Work item = (pair p, chunk c of kChunk elements of D). The chunking is FIXED (independent of the thread
//     count), items run in parallel (at::parallel_for) and each writes its partial sums to its own workspace slot:
//       S = sum m (pred - t)^2,  R = sum m (ref - t)^2,  Q = sum m (ref - pred)(ref + pred - 2t),  M = sum m
//     for the winner and the loser row of its pair. Both rows of a pair are processed by the same item, so a
//     shared [B, D] target (and mask) row is read once.
//   * Inside an item: 8 float lanes (4 double lanes for fp64) accumulate blocks of kBlock elements; each block's
//     lanes are flushed into double lanes; the chunk's lanes are summed in lane order. Fixed order everywhere.
//   * Then, serially and in a fixed order: chunk partials -> per-row sums (double) -> fdpo_pair_head<float>
//     (<double> for fp64 inputs) per pair -> the reduced loss. Same inputs, same bits, for any thread count.
// Backward: one elementwise pass over (pair, chunk) items: grad = grad_coef[row] * G[pair] * m * (pred - target)
//   in model_pred's dtype, with the shared target row read once per pair. Large fp32/fp64 gradients are written
//   with non-temporal stores (kStreamMinBytes). Where an overflowed coefficient is +-inf (forward_kl / alpha /
//   hellinger past exp's range), a scalar path gives 0 instead of inf * 0 = NaN where pred == target or m == 0.
//
// Vectorization. The inner loops are written on GCC vector extensions (8 x float = one AVX register) and compiled
// twice from this same file (it includes itself, see FDPO_CPU_KERNEL_BODY): a generic copy for the baseline ISA the
// extension is built for (x86-64: SSE2, so the built package runs on any x86-64 machine) and, on x86-64 with GCC,
// a copy under `#pragma GCC target("avx2,fma,f16c")` that uses F16C for fp16 and AVX2 for bf16 conversions. The
// AVX2 copy is chosen at run time when the CPU has AVX2+FMA+F16C (env FDIV_KERNELS_CPU_ISA=generic forces the
// generic copy, for tests). The two copies agree to fp32 rounding (FMA contraction), not bitwise; on one machine
// results are bitwise reproducible for any thread count. All indexing is int64_t.

#ifndef FDPO_CPU_KERNEL_BODY
// ===================================================================================================== part 1

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
#include <type_traits>
#include <vector>

#include "fdpo_math.h"
#include "fdpo_op.h"

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

// Element-type tags (fp16/bf16 are handled as raw 16-bit words).
struct F32 { using S = float; };
struct F64 { using S = double; };
struct BF16 { using S = uint16_t; };
struct F16 { using S = uint16_t; };
enum class Dtype { kF32, kF64, kBF16, kF16 };

constexpr int64_t kChunk = 4096;  // elements of D per work item (fixed: results do not depend on thread count)
constexpr int64_t kBlock = 1024;  // elements accumulated in float lanes before a flush into double lanes
constexpr int kSlots = 8;         // workspace doubles per item: S, R, Q, M of the winner, then of the loser
// Gradients of at least this many bytes are written with non-temporal (streaming) stores: a fresh multi-MB output
// is not in cache, and a plain store first reads every line it writes (read-for-ownership), an extra pass.
// Measured on the 2-core Xeon (Sapphire Rapids) dev machine, full fwd+bwd step: fp32 1.06-1.33x faster at 1 thread
// and up to 2.1x at 2 threads (SD1.5 to video shapes); fp16/bf16 outputs gain less (0.94-1.04x up to 4 MiB, 1.03-1.04x
// at 16 MiB), so they stream only from 8 MiB (smaller ones stay in cache for the next consumer).
// Env FDIV_KERNELS_CPU_STREAM_STORES=0 / 1 forces them off / on (when rows are aligned to the vector width).
constexpr int64_t kStreamMinBytes = int64_t(1) << 20;
constexpr int64_t kStreamMinBytes16 = int64_t(8) << 20;

struct FwdArgs {
  Dtype dtype;  // model_pred's; the other inputs may each have their own (mixed precision, see forward_mixed)
  Dtype ref_dtype, target_dtype, mask_dtype;
  const void* pred;
  const void* ref;     // nullptr: ref_err path
  const void* target;
  const void* mask;    // nullptr: no mask
  int64_t D, B, chunks;
  bool target_shared, mask_shared, interleaved;
  double* ws;          // [B * chunks * kSlots]
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
inline int64_t row_w(int64_t p, int64_t B, bool inter) { return inter ? 2 * p : p; }
inline int64_t row_l(int64_t p, int64_t B, bool inter) { return inter ? 2 * p + 1 : B + p; }

// Run f(std::integral_constant<bool, b>).
template <typename F>
inline void bool_dispatch(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// Run f(Tag{}) for the storage dtype's tag.
template <typename F>
inline void dtype_dispatch(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kF32: return f(F32{});
    case Dtype::kF64: return f(F64{});
    case Dtype::kBF16: return f(BF16{});
    case Dtype::kF16: return f(F16{});
  }
}

#define FDPO_CPU_KERNEL_BODY 1

namespace generic {
#define FDPO_CPU_AVX2 0
#include "fdpo_cpu.cpp"
#undef FDPO_CPU_AVX2
}  // namespace generic

#if FDPO_CPU_HAVE_AVX2_COPY
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
#define FDPO_CPU_AVX2 1
#include "fdpo_cpu.cpp"
#undef FDPO_CPU_AVX2
}  // namespace avx2
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
#endif

#undef FDPO_CPU_KERNEL_BODY

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
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kF32;
    case at::kDouble: return Dtype::kF64;
    case at::kBFloat16: return Dtype::kBF16;
    case at::kHalf: return Dtype::kF16;
    default: TORCH_CHECK(false, "fdiv_kernels (cpu): unsupported dtype ", t.scalar_type(),
                         "; expected float32, float16, bfloat16 or float64");
  }
  return Dtype::kF32;
}

template <typename T>
void pair_heads(const fdpo::HeadParams& hp, const FwdArgs& a, bool has_ref, int err_reduction, bool strict_ties,
                const T* ref_err, const T* pair_weight, T* loss, T* logits, T* stats, T* summary, T* coef) {
  const int64_t B = a.B, rows = 2 * B, nc = a.chunks, D = a.D;
  const bool has_mask = a.mask != nullptr;
  double total = 0.0, wins = 0.0, e_total = 0.0, eref_total = 0.0;
  for (int64_t p = 0; p < B; ++p) {
    double sums[kSlots] = {0, 0, 0, 0, 0, 0, 0, 0};
    const double* ws = a.ws + p * nc * kSlots;
    for (int64_t c = 0; c < nc; ++c)
      for (int k = 0; k < kSlots; ++k) sums[k] += ws[c * kSlots + k];
    const int64_t rw = row_w(p, B, a.interleaved), rl = row_l(p, B, a.interleaved);
    T e[2], eref[2], diff[2], inv[2];
    for (int h = 0; h < 2; ++h) {
      const double* s = sums + 4 * h;
      const double count = (has_mask && err_reduction == fdpo::kErrMean) ? s[3] : static_cast<double>(D);
      const double inv_d = err_reduction == fdpo::kErrSum ? 1.0 : (count > 0.0 ? 1.0 / count : 0.0);
      const int64_t row = h == 0 ? rw : rl;
      e[h] = static_cast<T>(s[0] * inv_d);
      inv[h] = static_cast<T>(inv_d);
      if (has_ref) {
        eref[h] = static_cast<T>(s[1] * inv_d);
        diff[h] = static_cast<T>(s[2] * inv_d);
      } else {
        eref[h] = ref_err[row];
        diff[h] = eref[h] - e[h];
      }
    }
    const T w = pair_weight != nullptr ? pair_weight[p] : T(1);
    const fdpo::PairHead<T> r = fdpo::fdpo_pair_head<T>(hp, diff[0], diff[1], inv[0], inv[1], w);
    logits[p] = r.logit;
    if (hp.reduction == fdpo::kNone) loss[p] = r.loss;
    total += static_cast<double>(r.loss);
    wins += static_cast<double>(fdpo::implicit_win(r.logit, strict_ties));
    e_total += static_cast<double>(e[0]) + static_cast<double>(e[1]);
    eref_total += static_cast<double>(eref[0]) + static_cast<double>(eref[1]);
    const int64_t idx[2] = {rw, rl};
    const T d[2] = {r.d_w, r.d_l}, rew[2] = {r.reward_w, r.reward_l}, cf[2] = {r.coef_w, r.coef_l};
    for (int h = 0; h < 2; ++h) {
      stats[0 * rows + idx[h]] = e[h];
      stats[1 * rows + idx[h]] = eref[h];
      stats[2 * rows + idx[h]] = d[h];
      stats[3 * rows + idx[h]] = rew[h];
      coef[idx[h]] = cf[h];
    }
  }
  if (hp.reduction == fdpo::kMean) loss[0] = static_cast<T>(total / static_cast<double>(B));
  if (hp.reduction == fdpo::kSum) loss[0] = static_cast<T>(total);
  summary[0] = static_cast<T>(wins / static_cast<double>(B));
  summary[1] = static_cast<T>(e_total / static_cast<double>(rows));
  summary[2] = static_cast<T>(eref_total / static_cast<double>(rows));
}

fdpo::ForwardOutputs forward_cpu(const at::Tensor& model_pred, const std::optional<at::Tensor>& ref_pred,
                                 const at::Tensor& target, const std::optional<at::Tensor>& ref_err,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& pair_weight,
                                 double beta, int64_t divergence, double alpha, double gamma, double label_smoothing,
                                 int64_t err_reduction, double logratio_clip, int64_t reduction, int64_t loss_type,
                                 double ipo_margin, bool interleaved, bool strict_ties) {
  TORCH_CHECK(model_pred.device().is_cpu(), "fdiv_kernels (cpu): model_pred must be a CPU tensor");
  fdpo::check_forward_ids("cpu", ref_pred.has_value(), ref_err.has_value(), divergence, reduction, err_reduction,
                          loss_type);
  const fdpo::RowViews v = fdpo::row_views("cpu", /*allow_double=*/true, model_pred, ref_pred, target, mask);
  const int64_t B = v.B, D = v.D, rows = 2 * B;
  const Dtype dt = dtype_of(v.pred);
  const at::ScalarType acc = dt == Dtype::kF64 ? at::kDouble : at::kFloat;
  at::Tensor rerr, pw;
  if (ref_err.has_value()) rerr = fdpo::small_vector(*ref_err, model_pred, acc, rows, "cpu", "ref_err");
  if (pair_weight.has_value()) pw = fdpo::small_vector(*pair_weight, model_pred, acc, B, "cpu", "pair_weight");
  const at::Tensor &pred = v.pred, &ref = v.ref, &tgt = v.target, &msk = v.mask;

  const int64_t chunks = (D + kChunk - 1) / kChunk;
  std::vector<double> ws(static_cast<size_t>(B * chunks * kSlots), 0.0);
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
  a.interleaved = interleaved;
  a.ws = ws.data();
  run_forward_items(a);

  fdpo::ForwardOutputs out = fdpo::empty_forward_outputs(pred, reduction);
  auto& [loss, logits, stats, summary, coef] = out;
  fdpo::HeadParams hp;
  hp.beta = beta;
  hp.divergence = static_cast<int>(divergence);
  hp.alpha = alpha;
  hp.gamma = gamma;
  hp.label_smoothing = label_smoothing;
  hp.logratio_clip = logratio_clip;
  hp.reduction = static_cast<int>(reduction);
  hp.loss_type = static_cast<int>(loss_type);
  hp.ipo_margin = ipo_margin;
  hp.num_pairs = B;
  const auto heads = [&](auto zero) {
    using T = decltype(zero);
    pair_heads<T>(hp, a, ref.defined(), static_cast<int>(err_reduction), strict_ties, rerr.defined() ? rerr.data_ptr<T>() : nullptr,
                  pw.defined() ? pw.data_ptr<T>() : nullptr, loss.data_ptr<T>(), logits.data_ptr<T>(),
                  stats.data_ptr<T>(), summary.data_ptr<T>(), coef.data_ptr<T>());
  };
  if (acc == at::kDouble) heads(0.0);
  else heads(0.0f);
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
  TORCH_CHECK(grad_loss.numel() == 1 || grad_loss.numel() == B,
              "fdiv_kernels (cpu): grad_loss must have 1 or B = ", B, " elements; got ", grad_loss.numel());
  const at::Tensor g = grad_loss.to(at::kCPU, at::kDouble).contiguous().reshape({-1});
  const at::Tensor cf = fdpo::small_vector(grad_coef, model_pred, dt == Dtype::kF64 ? at::kDouble : at::kFloat, rows,
                                           "cpu", "grad_coef");
  // Per-row scale coef * G, rounded to the accumulate type as the product in that type would be; 0 where either
  // factor is 0 (an overflowed coefficient times a zero upstream gradient is 0, not NaN).
  std::vector<double> scale(static_cast<size_t>(rows));
  const double* gp = g.data_ptr<double>();
  const bool per_pair = grad_loss.dim() == 1 && grad_loss.numel() == B;
  bool all_finite = true;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = interleaved ? i / 2 : i % B;
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
    const int64_t vec_bytes = (dt == Dtype::kF32 || dt == Dtype::kF64) ? 32 : 16;  // bytes of one stored vector
    const bool aligned = reinterpret_cast<uintptr_t>(a.grad) % vec_bytes == 0 &&
                         (D * static_cast<int64_t>(pred.element_size())) % vec_bytes == 0;
    const char* env = std::getenv("FDIV_KERNELS_CPU_STREAM_STORES");
    const bool want = env != nullptr && env[0] != '\0' ? std::strcmp(env, "0") != 0
                                                       : grad.numel() * pred.element_size() >=
                                                             (pred.element_size() >= 4 ? kStreamMinBytes
                                                                                       : kStreamMinBytes16);
    a.stream_stores = aligned && want;
  }
  // An overflowed (+-inf) coefficient (forward_kl/alpha/hellinger past exp's range, see docs/architecture.md)
  // takes the slower path that gives 0, not NaN, where pred == target or the mask is 0.
  if (D > 0) run_backward_items(a, !all_finite);
  return grad.view(model_pred.sizes());
}

}  // namespace fdpo_cpu

TORCH_LIBRARY_IMPL(fdiv_kernels, CPU, m) {
  m.impl("fdpo_forward", &fdpo_cpu::forward_cpu);
  m.impl("fdpo_backward", &fdpo_cpu::backward_cpu);
}

#else  // FDPO_CPU_KERNEL_BODY
// ===================================================================================================== part 2
// Compiled once per ISA copy (namespaces generic / avx2), with FDPO_CPU_AVX2 = 0 / 1. No #includes here.

// ---- bit casts
inline f32x8 as_f32(u32x8 v) {
  f32x8 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline u32x8 as_u32(f32x8 v) {
  u32x8 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline void flush8(Wide8& w, f32x8 v) {  // 8 float lanes -> 8 double lanes, lane order kept
#if defined(__clang__) || __GNUC__ >= 12
  w.lo += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), f64x4);
  w.hi += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), f64x4);
#else
  w.lo += f64x4{v[0], v[1], v[2], v[3]};
  w.hi += f64x4{v[4], v[5], v[6], v[7]};
#endif
}
inline u32x8 splat_u32(uint32_t x) { return u32x8{x, x, x, x, x, x, x, x}; }
inline f32x8 splat_f32(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

// Writes N = 16 or 32 bytes (p aligned to N when NT): a plain store, or a non-temporal (streaming) one that skips
// the read-for-ownership of the destination line (see kStreamMinBytes).
template <bool NT, int N>
inline void store_bytes(void* p, const void* src) {
#if defined(__x86_64__) || defined(_M_X64)
  if (NT) {
#if FDPO_CPU_AVX2
    if (N == 32) {
      __m256i x;
      std::memcpy(&x, src, 32);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x);
      return;
    }
#endif
    for (int k = 0; k < N; k += 16) {
      __m128i x;
      std::memcpy(&x, static_cast<const char*>(src) + k, 16);
      _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + k), x);
    }
    return;
  }
#endif
  std::memcpy(p, src, N);
}

inline void stream_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

// ---- element conversions: Cvt<Tag> gives the lane count L, the accumulate type A, its vector V (L lanes), the
// double-lane flush type W and exact loads/stores (fp16/bf16 round to nearest even on store, like torch).
template <typename Tag>
struct Cvt;

// float and double are stored as their own accumulate type: plain loads and stores, no conversion.
template <typename T, typename Vec>
struct PlainCvt {
  using A = T;
  using V = Vec;
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  template <bool NT>
  static void store(T* p, V v) { store_bytes<NT, sizeof(V)>(p, &v); }
  static A load1(const T* p) { return *p; }
  static void store1(T* p, A v) { *p = v; }
};

template <>
struct Cvt<F32> : PlainCvt<float, f32x8> {
  static constexpr int L = 8;
  using W = Wide8;
  static void flush(W& w, V v) { flush8(w, v); }
  static double lane(const W& w, int l) { return l < 4 ? w.lo[l] : w.hi[l - 4]; }
};

template <>
struct Cvt<F64> : PlainCvt<double, f64x4> {
  static constexpr int L = 4;
  using W = f64x4;
  static void flush(W& w, V v) { w += v; }
  static double lane(const W& w, int l) { return w[l]; }
};

inline uint16_t bf16_bits_rne(float f) {  // c10::detail::round_to_nearest_even
  if (f != f) return UINT16_C(0x7FC0);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16);
}

template <>
struct Cvt<BF16> {
  static constexpr int L = 8;
  using A = float;
  using V = f32x8;
  using W = Wide8;
  static V load(const uint16_t* p) {
#if FDPO_CPU_AVX2
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return (V)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    u16x8 h;
    std::memcpy(&h, p, sizeof h);
    return as_f32(__builtin_convertvector(h, u32x8) << 16);
#endif
  }
  template <bool NT>
  static void store(uint16_t* p, V v) {
    const u32x8 u = as_u32(v);
    const u32x8 rounded = (u + splat_u32(0x7FFFu) + ((u >> 16) & splat_u32(1u))) >> 16;
    const u32x8 r = (v != v) ? splat_u32(0x7FC0u) : rounded;
#if FDPO_CPU_AVX2
    const __m256i ri = (__m256i)r;
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(ri), _mm256_extracti128_si256(ri, 1));
#else
    const u16x8 h = __builtin_convertvector(r, u16x8);
#endif
    store_bytes<NT, 16>(p, &h);
  }
  static A load1(const uint16_t* p) {
    const uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static void store1(uint16_t* p, A v) { *p = bf16_bits_rne(v); }
  static void flush(W& w, V v) { flush8(w, v); }
  static double lane(const W& w, int l) { return l < 4 ? w.lo[l] : w.hi[l - 4]; }
};

template <>
struct Cvt<F16> {
  static constexpr int L = 8;
  using A = float;
  using V = f32x8;
  using W = Wide8;
  static V load(const uint16_t* p) {
#if FDPO_CPU_AVX2
    return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    // c10::detail::fp16_ieee_to_fp32_value, on 8 lanes (exact).
    u16x8 h;
    std::memcpy(&h, p, sizeof h);
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    const u32x8 sign = w & splat_u32(0x80000000u);
    const u32x8 two_w = w + w;
    const f32x8 normalized = as_f32((two_w >> 4) + splat_u32(0xE0u << 23)) * splat_f32(0x1.0p-112f);
    const f32x8 denormalized = as_f32((two_w >> 17) | splat_u32(126u << 23)) - splat_f32(0.5f);
    const u32x8 bits = (two_w < splat_u32(1u << 27)) ? as_u32(denormalized) : as_u32(normalized);
    return as_f32(sign | bits);
#endif
  }
  template <bool NT>
  static void store(uint16_t* p, V v) {
#if FDPO_CPU_AVX2
    const __m128i h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    store_bytes<NT, 16>(p, &h);
#else
    // c10::detail::fp16_ieee_from_fp32_value, on 8 lanes (round to nearest even).
    const u32x8 w = as_u32(v);
    const u32x8 shl1_w = w + w;
    const u32x8 sign = w & splat_u32(0x80000000u);
    f32x8 base = (as_f32(w & splat_u32(0x7FFFFFFFu)) * splat_f32(0x1.0p+112f)) * splat_f32(0x1.0p-110f);
    u32x8 bias = shl1_w & splat_u32(0xFF000000u);
    bias = (bias < splat_u32(0x71000000u)) ? splat_u32(0x71000000u) : bias;
    base = as_f32((bias >> 1) + splat_u32(0x07800000u)) + base;
    const u32x8 bits = as_u32(base);
    const u32x8 nonsign = ((bits >> 13) & splat_u32(0x00007C00u)) + (bits & splat_u32(0x00000FFFu));
    const u32x8 r = (sign >> 16) | ((shl1_w > splat_u32(0xFF000000u)) ? splat_u32(0x7E00u) : nonsign);
    const u16x8 h = __builtin_convertvector(r, u16x8);
    store_bytes<NT, 16>(p, &h);
#endif
  }
  static A load1(const uint16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(*p); }
  static void store1(uint16_t* p, A v) { *p = c10::detail::fp16_ieee_from_fp32_value(v); }
  static void flush(W& w, V v) { flush8(w, v); }
  static double lane(const W& w, int l) { return l < 4 ? w.lo[l] : w.hi[l - 4]; }
};

// ---- forward: one (pair, chunk) item. Accumulators of the winner (index 0) and the loser (index 1) row.
template <typename Tag, bool REF, bool MASK, bool SHARED_T, bool SHARED_M>
struct FwdItem {
  using C = Cvt<Tag>;
  using S = typename Tag::S;
  using A = typename C::A;
  using V = typename C::V;
  using W = typename C::W;
  static constexpr int L = C::L;

  // Adds the terms of one position into acc[row][quantity]: L elements as vectors (X = V, load = C::load) in the
  // main loop, one element (X = A, load = C::load1) in the tail.
  template <typename X, typename Load>
  static inline void add_terms(X (&acc)[2][4], Load load, const S* const (&p)[2], const S* const (&r)[2],
                               const S* const (&t)[2], const S* const (&m)[2], int64_t i) {
    const X t0 = load(t[0] + i);
    const X tt[2] = {t0, SHARED_T ? t0 : load(t[1] + i)};
    X mm[2] = {X{}, X{}};
    if (MASK) {
      mm[0] = load(m[0] + i);
      mm[1] = SHARED_M ? mm[0] : load(m[1] + i);
    }
    for (int h = 0; h < 2; ++h) {
      const X pv = load(p[h] + i);
      const X a = pv - tt[h];
      if (MASK) {
        acc[h][0] += (a * a) * mm[h];
        acc[h][3] += mm[h];
      } else {
        acc[h][0] += a * a;
      }
      if (REF) {
        const X rv = load(r[h] + i);
        const X b = rv - tt[h];
        const X q = (rv - pv) * (a + b);  // (ref - pred) * (ref + pred - 2t), the gap without cancellation
        if (MASK) {
          acc[h][1] += (b * b) * mm[h];
          acc[h][2] += q * mm[h];
        } else {
          acc[h][1] += b * b;
          acc[h][2] += q;
        }
      }
    }
  }

  static inline void step(V (&acc)[2][4], const S* const (&p)[2], const S* const (&r)[2], const S* const (&t)[2],
                          const S* const (&m)[2], int64_t i) {
    add_terms(acc, [](const S* x) { return C::load(x); }, p, r, t, m, i);
  }

  static inline void step1(A (&acc)[2][4], const S* const (&p)[2], const S* const (&r)[2], const S* const (&t)[2],
                           const S* const (&m)[2], int64_t i) {
    add_terms(acc, [](const S* x) { return C::load1(x); }, p, r, t, m, i);
  }

  // Sums elements [begin, end) of the pair's rows into out[kSlots].
  static void run(const S* const (&p)[2], const S* const (&r)[2], const S* const (&t)[2], const S* const (&m)[2],
                  int64_t begin, int64_t end, double* out) {
    constexpr int NQ = 4;
    W wide[2][NQ];
    std::memset(&wide, 0, sizeof wide);
    int64_t i = begin;
    const int64_t vec_end = begin + ((end - begin) / L) * L;
    while (i < vec_end) {
      const int64_t block_end = (vec_end - i) > kBlock ? i + kBlock : vec_end;
      V acc[2][NQ];
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < NQ; ++k) acc[h][k] = V{};
      for (; i < block_end; i += L) step(acc, p, r, t, m, i);
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < NQ; ++k) C::flush(wide[h][k], acc[h][k]);
    }
    A tail[2][NQ] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
    for (; i < end; ++i) step1(tail, p, r, t, m, i);
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < NQ; ++k) {
        double s = 0.0;
        for (int l = 0; l < L; ++l) s += C::lane(wide[h][k], l);
        out[4 * h + k] = s + static_cast<double>(tail[h][k]);
      }
  }
};

// The work split of both passes: items (pair, chunk of kChunk elements) over at::parallel_for. For each item,
// item(it, pair rows {w, l}, their target rows, their mask rows, [lo, hi)); task_end() after each task's items.
struct PairChunk {
  int64_t index;
  int64_t rows[2], target_rows[2], mask_rows[2];
  int64_t lo, hi;
};

template <bool SHARED_T, bool SHARED_M, typename Args, typename Item, typename TaskEnd>
void for_each_pair_chunk(const Args& a, Item&& item, TaskEnd&& task_end) {
  const int64_t D = a.D, B = a.B, nc = a.chunks;
  // At least ~64K elements per task, so tiny problems do not pay for waking threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (2 * kChunk));
  at::parallel_for(0, B * nc, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t pair = it / nc, c = it % nc;
      const int64_t rw = row_w(pair, B, a.interleaved), rl = row_l(pair, B, a.interleaved);
      const int64_t lo = c * kChunk;
      item(PairChunk{it,
                     {rw, rl},
                     {SHARED_T ? pair : rw, SHARED_T ? pair : rl},
                     {SHARED_M ? pair : rw, SHARED_M ? pair : rl},
                     lo,
                     std::min(D, lo + kChunk)});
    }
    task_end();
  });
}

template <typename Tag, bool REF, bool MASK, bool SHARED_T, bool SHARED_M>
void forward_typed(const FwdArgs& a) {
  using S = typename Tag::S;
  using Item = FwdItem<Tag, REF, MASK, SHARED_T, SHARED_M>;
  const S* pred = static_cast<const S*>(a.pred);
  const S* ref = static_cast<const S*>(a.ref);
  const S* tgt = static_cast<const S*>(a.target);
  const S* msk = static_cast<const S*>(a.mask);
  const int64_t D = a.D;
  for_each_pair_chunk<SHARED_T, SHARED_M>(a, [&](const PairChunk& w) {
    const S* const pp[2] = {pred + w.rows[0] * D, pred + w.rows[1] * D};
    const S* const rr[2] = {REF ? ref + w.rows[0] * D : nullptr, REF ? ref + w.rows[1] * D : nullptr};
    const S* const tt[2] = {tgt + w.target_rows[0] * D, tgt + w.target_rows[1] * D};
    const S* const mm[2] = {MASK ? msk + w.mask_rows[0] * D : nullptr, MASK ? msk + w.mask_rows[1] * D : nullptr};
    Item::run(pp, rr, tt, mm, w.lo, w.hi, a.ws + w.index * kSlots);
  }, [] {});
}

template <typename Tag>
void forward_tag(const FwdArgs& a) {
  bool_dispatch(a.ref != nullptr, [&](auto ref) {
    bool_dispatch(a.target_shared, [&](auto shared_t) {
      if (a.mask == nullptr) {
        forward_typed<Tag, decltype(ref)::value, false, decltype(shared_t)::value, false>(a);
      } else {
        bool_dispatch(a.mask_shared, [&](auto shared_m) {
          forward_typed<Tag, decltype(ref)::value, true, decltype(shared_t)::value, decltype(shared_m)::value>(a);
        });
      }
    });
  });
}

// ---- mixed input dtypes (e.g. Accelerate: fp32 model_pred holding bf16 values, bf16 target and reference).
// The arithmetic type A is float (double for fp64 model_pred). Each (pair, chunk) item converts the rows of the
// inputs not stored as A into per-thread scratch (a chunk is kChunk elements: the scratch stays in L1/L2) and runs
// A's kernel on it. Every input is read once from memory in its own dtype and no tensor-sized copy is made; since
// the conversions are exact and the item's summation order is that of A's own kernel, the results are bitwise
// those of casting every input to A first.
template <typename A>
using ComputeTag = std::conditional_t<std::is_same<A, double>::value, F64, F32>;

template <typename A>
constexpr Dtype compute_dtype() {
  return std::is_same<A, double>::value ? Dtype::kF64 : Dtype::kF32;
}

// Row `row`, elements [lo, lo + n), of a [rows, D] input of dtype `dt`, as A: a pointer into the input when it is
// stored as A, else into `scratch` after converting.
template <typename A>
const A* chunk_as(Dtype dt, const void* base, int64_t D, int64_t row, int64_t lo, int64_t n, A* scratch) {
  if (dt == compute_dtype<A>()) return static_cast<const A*>(base) + row * D + lo;
  dtype_dispatch(dt, [&](auto tag) {
    using Tag = decltype(tag);
    const typename Tag::S* src = static_cast<const typename Tag::S*>(base) + row * D + lo;
    for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<A>(Cvt<Tag>::load1(src + i));
  });
  return scratch;
}

// Per-thread scratch for up to 8 converted input rows of one chunk.
template <typename A>
A* scratch_rows() {
  thread_local std::vector<A> buffer(8 * kChunk);
  return buffer.data();
}

template <typename A, bool REF, bool MASK, bool SHARED_T, bool SHARED_M>
void forward_mixed_typed(const FwdArgs& a) {
  using Item = FwdItem<ComputeTag<A>, REF, MASK, SHARED_T, SHARED_M>;
  const int64_t D = a.D;
  for_each_pair_chunk<SHARED_T, SHARED_M>(a, [&](const PairChunk& w) {
    A* scratch = scratch_rows<A>();
    const int64_t n = w.hi - w.lo;
    auto rows = [&](Dtype dt, const void* base, const int64_t (&r)[2], bool shared, int slot, const A* (&out)[2]) {
      out[0] = chunk_as<A>(dt, base, D, r[0], w.lo, n, scratch + slot * kChunk);
      out[1] = shared ? out[0] : chunk_as<A>(dt, base, D, r[1], w.lo, n, scratch + (slot + 1) * kChunk);
    };
    const A *pp[2], *rr[2] = {nullptr, nullptr}, *tt[2], *mm[2] = {nullptr, nullptr};
    rows(a.dtype, a.pred, w.rows, false, 0, pp);
    if (REF) rows(a.ref_dtype, a.ref, w.rows, false, 2, rr);
    rows(a.target_dtype, a.target, w.target_rows, SHARED_T, 4, tt);
    if (MASK) rows(a.mask_dtype, a.mask, w.mask_rows, SHARED_M, 6, mm);
    const A* const cp[2] = {pp[0], pp[1]};
    const A* const cr[2] = {rr[0], rr[1]};
    const A* const ct[2] = {tt[0], tt[1]};
    const A* const cm[2] = {mm[0], mm[1]};
    Item::run(cp, cr, ct, cm, 0, n, a.ws + w.index * kSlots);
  }, [] {});
}

template <typename A>
void forward_mixed(const FwdArgs& a) {
  bool_dispatch(a.ref != nullptr, [&](auto ref) {
    bool_dispatch(a.target_shared, [&](auto shared_t) {
      if (a.mask == nullptr) {
        forward_mixed_typed<A, decltype(ref)::value, false, decltype(shared_t)::value, false>(a);
      } else {
        bool_dispatch(a.mask_shared, [&](auto shared_m) {
          forward_mixed_typed<A, decltype(ref)::value, true, decltype(shared_t)::value, decltype(shared_m)::value>(a);
        });
      }
    });
  });
}

inline void forward_items(const FwdArgs& a) {
  if (a.mixed()) {
    if (a.dtype == Dtype::kF64) return forward_mixed<double>(a);
    return forward_mixed<float>(a);
  }
  dtype_dispatch(a.dtype, [&](auto tag) { forward_tag<decltype(tag)>(a); });
}

// ---- backward: grad = scale[row] * (pred - target) [* mask], both rows of a pair per item.
template <typename Tag, bool MASK, bool SHARED_T, bool SHARED_M, bool NT>
void backward_typed(const BwdArgs& a) {
  using C = Cvt<Tag>;
  using S = typename Tag::S;
  using A = typename C::A;
  using V = typename C::V;
  constexpr int L = C::L;
  const S* pred = static_cast<const S*>(a.pred);
  const S* tgt = static_cast<const S*>(a.target);
  const S* msk = static_cast<const S*>(a.mask);
  S* grad = static_cast<S*>(a.grad);
  const int64_t D = a.D;
  for_each_pair_chunk<SHARED_T, SHARED_M>(a, [&](const PairChunk& w) {
    const S* const pp[2] = {pred + w.rows[0] * D, pred + w.rows[1] * D};
    const S* const tt[2] = {tgt + w.target_rows[0] * D, tgt + w.target_rows[1] * D};
    const S* const mm[2] = {MASK ? msk + w.mask_rows[0] * D : nullptr, MASK ? msk + w.mask_rows[1] * D : nullptr};
    S* const gg[2] = {grad + w.rows[0] * D, grad + w.rows[1] * D};
    const A s[2] = {static_cast<A>(a.scale[w.rows[0]]), static_cast<A>(a.scale[w.rows[1]])};
    // Both rows of the pair at position i: L elements as vectors (X = V) in the main loop, one (X = A) in the tail.
    auto write = [&](auto load, auto store, const auto (&scale)[2], int64_t i) {
      using X = std::remove_const_t<std::remove_reference_t<decltype(scale[0])>>;
      const X t0 = load(tt[0] + i);
      const X tv[2] = {t0, SHARED_T ? t0 : load(tt[1] + i)};
      X mv[2] = {X{}, X{}};
      if (MASK) {
        mv[0] = load(mm[0] + i);
        mv[1] = SHARED_M ? mv[0] : load(mm[1] + i);
      }
      for (int h = 0; h < 2; ++h) {
        X g = scale[h] * (load(pp[h] + i) - tv[h]);
        if (MASK) g = g * mv[h];
        store(gg[h] + i, g);
      }
    };
    const V sv[2] = {V{} + s[0], V{} + s[1]};  // broadcast
    const int64_t vec_hi = w.lo + ((w.hi - w.lo) / L) * L;
    int64_t i = w.lo;
    for (; i < vec_hi; i += L) {
      write([](const S* x) { return C::load(x); }, [](S* x, V v) { C::template store<NT>(x, v); }, sv, i);
    }
    for (; i < w.hi; ++i) {
      write([](const S* x) { return C::load1(x); }, [](S* x, A v) { C::store1(x, v); }, s, i);
    }
  }, [] {
    if (NT) stream_fence();  // order the streaming stores before the task ends
  });
}

template <typename Tag>
void backward_tag(const BwdArgs& a) {
  bool_dispatch(a.stream_stores, [&](auto nt) {
    bool_dispatch(a.target_shared, [&](auto shared_t) {
      if (a.mask == nullptr) {
        backward_typed<Tag, false, decltype(shared_t)::value, false, decltype(nt)::value>(a);
      } else {
        bool_dispatch(a.mask_shared, [&](auto shared_m) {
          backward_typed<Tag, true, decltype(shared_t)::value, decltype(shared_m)::value, decltype(nt)::value>(a);
        });
      }
    });
  });
}

inline void backward_items(const BwdArgs& a) {
  dtype_dispatch(a.dtype, [&](auto tag) { backward_tag<decltype(tag)>(a); });
}

// Scalar backward with mul0 semantics, for calls where some row's scale is +-inf: grad = mul0(mul0(s, p - t), m).
template <typename Tag>
void backward_safe_typed(const BwdArgs& a) {
  using C = Cvt<Tag>;
  using S = typename Tag::S;
  using A = typename C::A;
  const S* pred = static_cast<const S*>(a.pred);
  const S* tgt = static_cast<const S*>(a.target);
  const S* msk = static_cast<const S*>(a.mask);
  S* grad = static_cast<S*>(a.grad);
  const int64_t D = a.D, B = a.B, rows = 2 * B;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t pair = a.interleaved ? row / 2 : row % B;
      const S* p = pred + row * D;
      const S* t = tgt + (a.target_shared ? pair : row) * D;
      const S* m = msk == nullptr ? nullptr : msk + (a.mask_shared ? pair : row) * D;
      S* g = grad + row * D;
      const A s = static_cast<A>(a.scale[row]);
      for (int64_t j = 0; j < D; ++j) {
        A v = fdpo::mul0(s, C::load1(p + j) - C::load1(t + j));
        if (m != nullptr) v = fdpo::mul0(v, C::load1(m + j));
        C::store1(g + j, v);
      }
    }
  });
}

inline void backward_items_safe(const BwdArgs& a) {
  dtype_dispatch(a.dtype, [&](auto tag) { backward_safe_typed<decltype(tag)>(a); });
}

// Mixed input dtypes: grad = mul0(mul0(s, pred - target), m) in A over converted chunks (see forward_mixed), rounded
// once to model_pred's dtype. mul0 throughout, so this path also serves overflowed (+-inf) scales.
template <typename A, typename PredTag, bool MASK, bool SHARED_T, bool SHARED_M>
void backward_mixed_typed(const BwdArgs& a) {
  using S = typename PredTag::S;
  const int64_t D = a.D;
  for_each_pair_chunk<SHARED_T, SHARED_M>(a, [&](const PairChunk& w) {
    A* scratch = scratch_rows<A>();
    const int64_t n = w.hi - w.lo;
    A* out = scratch + 6 * kChunk;  // the gradient of one row before rounding to model_pred's dtype
    const A* t0 = chunk_as<A>(a.target_dtype, a.target, D, w.target_rows[0], w.lo, n, scratch + 2 * kChunk);
    const A* tv[2] = {t0, SHARED_T ? t0
                                   : chunk_as<A>(a.target_dtype, a.target, D, w.target_rows[1], w.lo, n,
                                                 scratch + 3 * kChunk)};
    const A* mv[2] = {nullptr, nullptr};
    if (MASK) {
      mv[0] = chunk_as<A>(a.mask_dtype, a.mask, D, w.mask_rows[0], w.lo, n, scratch + 4 * kChunk);
      mv[1] = SHARED_M ? mv[0] : chunk_as<A>(a.mask_dtype, a.mask, D, w.mask_rows[1], w.lo, n, scratch + 5 * kChunk);
    }
    for (int h = 0; h < 2; ++h) {
      const A* pv = chunk_as<A>(a.dtype, a.pred, D, w.rows[h], w.lo, n, scratch + h * kChunk);
      const A s = static_cast<A>(a.scale[w.rows[h]]);
      for (int64_t i = 0; i < n; ++i) {
        A g = fdpo::mul0(s, pv[i] - tv[h][i]);
        if (MASK) g = fdpo::mul0(g, mv[h][i]);
        out[i] = g;
      }
      S* dst = static_cast<S*>(a.grad) + w.rows[h] * D + w.lo;
      for (int64_t i = 0; i < n; ++i) Cvt<PredTag>::store1(dst + i, static_cast<typename Cvt<PredTag>::A>(out[i]));
    }
  }, [] {});
}

template <typename A, typename PredTag>
void backward_mixed(const BwdArgs& a) {
  bool_dispatch(a.target_shared, [&](auto shared_t) {
    if (a.mask == nullptr) {
      backward_mixed_typed<A, PredTag, false, decltype(shared_t)::value, false>(a);
    } else {
      bool_dispatch(a.mask_shared, [&](auto shared_m) {
        backward_mixed_typed<A, PredTag, true, decltype(shared_t)::value, decltype(shared_m)::value>(a);
      });
    }
  });
}

inline void backward_items_mixed(const BwdArgs& a) {
  dtype_dispatch(a.dtype, [&](auto tag) {
    using PredTag = decltype(tag);
    if (a.dtype == Dtype::kF64) backward_mixed<double, PredTag>(a);
    else backward_mixed<float, PredTag>(a);
  });
}

#endif  // FDPO_CPU_KERNEL_BODY
