// What the op layer (ops.cpp) and every compiled kernel (fdpo_cpu.cpp, fdpo_cuda.cu) share about the ops
// fdiv_kernels::fdpo_forward / fdpo_backward: their outputs, and one set of input checks and row views, so the
// CPU and CUDA kernels accept and reject the same inputs. User-facing validation (messages naming the argument)
// happens before, in fdiv_kernels/_validation.py; these checks guard direct callers of torch.ops.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "fdpo_math.h"

namespace fdpo {

// loss ([] or [B]), logits [B], sample_stats [4, 2B] (e, e_ref, d, psi(d)), summary [kSummaryLen], grad_coef [2B]
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// summary = implicit_acc, raw_model_loss (mean e), raw_ref_loss (mean e_ref): the scalars trainers log, reduced
// in the kernels' pair head so that statistics cost no extra launch; then X = sum over pairs and elements of
// (pred_w - t_w)(pred_l - t_l) when the configuration's cross_term is set (the SDPO safeguard's g_l . g_w, no
// extra pass), else 0. Python twin: backends/common.py SUMMARY_LEN.
constexpr int64_t kSummaryLen = 4;

// The arithmetic type for inputs whose model_pred has dtype `t`: float64 stays float64, fp32/fp16/bf16 accumulate in
// float32 (spec §2). The one home of this rule in C++; fdiv_kernels/backends/common.py has the Python twin.
inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The forward's outputs, allocated once per call in the accumulate dtype.
inline ForwardOutputs empty_forward_outputs(const at::Tensor& model_pred, int64_t reduction) {
  const int64_t rows = model_pred.size(0), B = rows / 2;
  const auto opts = model_pred.options().dtype(accumulate_type(model_pred.scalar_type()));
  return {reduction == 0 ? at::empty({B}, opts) : at::empty({}, opts), at::empty({B}, opts), at::empty({4, rows}, opts),
          at::empty({kSummaryLen}, opts), at::empty({rows}, opts)};
}

// Storage dtypes of the inputs, as the CUDA mixed-dtype kernels read them (a plain int: usable in device code).
enum InputDtype : int { kInF32 = 0, kInF16 = 1, kInBF16 = 2 };

inline int input_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? kInF16 : t.scalar_type() == at::kBFloat16 ? kInBF16 : kInF32;
}

inline bool is_kernel_dtype(at::ScalarType t, bool allow_double) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (allow_double && t == at::kDouble);
}

// Inputs of one call as contiguous [rows, D] views (a copy only for non-contiguous input).
struct RowViews {
  at::Tensor pred, ref, target, mask;  // ref, mask: undefined when absent
  int64_t B = 0, D = 0;
  bool target_shared = false, mask_shared = false;
};

inline at::Tensor rows_of(const at::Tensor& t, const at::Tensor& pred, const char* backend, const char* name,
                          bool allow_shared, bool allow_double) {
  const int64_t rows = pred.size(0);
  TORCH_CHECK(t.device() == pred.device(), "fdiv_kernels (", backend, "): ", name, " is on ", t.device(),
              " but model_pred is on ", pred.device());
  TORCH_CHECK(is_kernel_dtype(t.scalar_type(), allow_double), "fdiv_kernels (", backend, "): ", name,
              " must be float32, float16 or bfloat16", allow_double ? " (or float64)" : "", "; got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && (t.size(0) == rows || (allow_shared && 2 * t.size(0) == rows)) &&
                  t.numel() / std::max<int64_t>(t.size(0), 1) * rows == pred.numel(),
              "fdiv_kernels (", backend, "): ", name, " must have model_pred's shape ", pred.sizes(),
              allow_shared ? " or be shared by each pair ([B, ...])" : "", "; got ", t.sizes());
  return t.reshape({t.size(0), -1}).contiguous();
}

inline RowViews row_views(const char* backend, bool allow_double, const at::Tensor& model_pred,
                          const std::optional<at::Tensor>& ref_pred, const at::Tensor& target,
                          const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(model_pred.dim() >= 2 && model_pred.size(0) > 0 && model_pred.size(0) % 2 == 0 && model_pred.numel() > 0,
              "fdiv_kernels (", backend, "): model_pred must be [2B, ...] with B > 0 and a non-empty sample; got ",
              model_pred.sizes());
  TORCH_CHECK(is_kernel_dtype(model_pred.scalar_type(), allow_double), "fdiv_kernels (", backend,
              "): model_pred must be float32, float16 or bfloat16", allow_double ? " (or float64)" : "", "; got ",
              model_pred.scalar_type());
  RowViews v;
  v.pred = model_pred.reshape({model_pred.size(0), -1}).contiguous();
  v.B = v.pred.size(0) / 2;
  v.D = v.pred.size(1);
  if (ref_pred.has_value()) v.ref = rows_of(*ref_pred, model_pred, backend, "ref_pred", false, allow_double);
  v.target = rows_of(target, model_pred, backend, "target", true, allow_double);
  v.target_shared = v.target.size(0) == v.B;
  if (mask.has_value()) {
    v.mask = rows_of(*mask, model_pred, backend, "mask", true, allow_double);
    v.mask_shared = v.mask.size(0) == v.B;
  }
  return v;
}

// A small per-row or per-pair vector (ref_err, pair_weight, grad_coef, grad_loss) in dtype `acc` on model_pred's
// device (a device-side cast when needed: no host sync).
inline at::Tensor small_vector(const at::Tensor& t, const at::Tensor& pred, at::ScalarType acc, int64_t numel,
                               const char* backend, const char* name) {
  TORCH_CHECK(t.device() == pred.device(), "fdiv_kernels (", backend, "): ", name, " is on ", t.device(),
              " but model_pred is on ", pred.device());
  TORCH_CHECK(t.numel() == numel, "fdiv_kernels (", backend, "): ", name, " must have ", numel, " elements; got ",
              t.sizes());
  return t.to(acc).contiguous().reshape({numel});
}

// Layout of the op's configuration, the packed arguments `float[] fparams, int[] iparams` of fdpo_forward: index
// of each scalar. The Python twin is OP_FLOATS / OP_INTS in fdiv_kernels/options.py (tests/test_ops.py compares).
// (Scoped in structs: the names would clash with the ids' enums of fdpo_math.h, e.g. kAlpha.)
struct FloatParam {
  enum : int {
    kBeta,
    kAlpha,
    kGamma,
    kLabelSmoothing,
    kLogratioClip,
    kIpoMargin,
    kDmpoLogQ,
    kDmpoLog1mq,
    kMapoSnr,
    kMapoTimesteps,
    kCount
  };
};
struct IntParam {
  enum : int { kDivergence, kErrReduction, kReduction, kLossType, kInterleaved, kStrictTies, kCrossTerm, kCount };
};

inline void check_layout(const char* backend, c10::ArrayRef<double> f, c10::ArrayRef<int64_t> i) {
  TORCH_CHECK(f.size() == static_cast<size_t>(FloatParam::kCount) && i.size() == static_cast<size_t>(IntParam::kCount),
              "fdiv_kernels (", backend, "): the configuration must be ", FloatParam::kCount, " floats and ",
              IntParam::kCount, " ints (fdiv_kernels/options.py OP_FLOATS / OP_INTS); got ", f.size(), " and ",
              i.size());
}

// The op's configuration, checked (ids in range) and parsed once per call for the CPU and CUDA kernels.
inline HeadParams head_params(const char* backend, c10::ArrayRef<double> f, c10::ArrayRef<int64_t> i, int64_t B) {
  check_layout(backend, f, i);
  const auto id = [&](int k, int64_t last, const char* name) {
    TORCH_CHECK(i[k] >= 0 && i[k] <= last, "fdiv_kernels (", backend, "): unknown ", name, " id ", i[k]);
    return static_cast<int>(i[k]);
  };
  HeadParams p;
  p.beta = f[FloatParam::kBeta];
  p.alpha = f[FloatParam::kAlpha];
  p.gamma = f[FloatParam::kGamma];
  p.label_smoothing = f[FloatParam::kLabelSmoothing];
  p.logratio_clip = f[FloatParam::kLogratioClip];
  p.ipo_margin = f[FloatParam::kIpoMargin];
  p.dmpo_log_q = f[FloatParam::kDmpoLogQ];
  p.dmpo_log_1mq = f[FloatParam::kDmpoLog1mq];
  p.mapo_snr = f[FloatParam::kMapoSnr];
  p.mapo_timesteps = f[FloatParam::kMapoTimesteps];
  p.divergence = id(IntParam::kDivergence, kHellinger, "divergence");
  p.err_reduction = id(IntParam::kErrReduction, kErrMeanAll, "err_reduction");
  p.reduction = id(IntParam::kReduction, kSum, "reduction");
  p.loss_type = id(IntParam::kLossType, kMaPO, "loss_type");
  p.interleaved = i[IntParam::kInterleaved] != 0;
  p.strict_ties = i[IntParam::kStrictTies] != 0;
  p.cross_term = i[IntParam::kCrossTerm] != 0;
  p.num_pairs = B;
  return p;
}

inline void check_reference(const char* backend, bool has_ref_pred, bool has_ref_err) {
  TORCH_CHECK(has_ref_pred != has_ref_err, "fdiv_kernels (", backend, "): pass exactly one of ref_pred and ref_err");
}

// The cross term X is defined on the unmasked residuals (the SDPO safeguard refuses masks): a mask is refused.
inline void check_cross_term(const char* backend, const HeadParams& hp, bool has_mask) {
  TORCH_CHECK(!(hp.cross_term && has_mask), "fdiv_kernels (", backend,
              "): cross_term (summary[3], the SDPO safeguard's g_l . g_w) is defined without a mask; got a mask");
}

}  // namespace fdpo
