// The native ops of fdiv_kernels: schemas, meta kernels and autograd, all in C++.
//
//   fdiv_kernels::fdpo_forward  -> (loss, logits, sample_stats, summary, grad_coef)
//   fdiv_kernels::fdpo_backward -> d loss / d model_pred
//
// The dispatcher picks the kernel from the tensors' device: fdpo_cpu.cpp registers the CPU kernels, fdpo_cuda.cu
// the CUDA ones (or, in a build without them, fdiv_kernels/ops.py registers the Triton kernels for CUDA). The
// autograd kernel below is registered for the Autograd key, so an eager call costs one dispatcher call forward and
// one backward, with no Python on either path; Meta kernels give torch.compile the output shapes. Nothing here
// synchronizes with the host, so CUDA graphs capture the ops. docs/spec.md states the contract.
#include <Python.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "fdpo_op.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

fdpo::ForwardOutputs forward_meta(const at::Tensor& model_pred, const std::optional<at::Tensor>&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, double, int64_t, double, double, double, int64_t,
                                  double, int64_t reduction, int64_t, double, bool, bool) {
  return fdpo::empty_forward_outputs(model_pred, reduction);
}

at::Tensor backward_meta(const at::Tensor&, const at::Tensor& model_pred, const at::Tensor&,
                         const std::optional<at::Tensor>&, const at::Tensor&, bool) {
  return at::empty(model_pred.sizes(), model_pred.options());  // contiguous, like every kernel's gradient
}

// Typed handles of the ops, looked up once.
const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fdiv_kernels::fdpo_forward", "").typed<decltype(forward_meta)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fdiv_kernels::fdpo_backward", "")
                             .typed<decltype(backward_meta)>();
  return op;
}

constexpr int kForwardArgs = 18;

class FdpoForward : public torch::autograd::Function<FdpoForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_pred,
                               const std::optional<at::Tensor>& ref_pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& pair_weight, double beta, int64_t divergence,
                               double alpha, double gamma, double label_smoothing, int64_t err_reduction,
                               double logratio_clip, int64_t reduction, int64_t loss_type, double ipo_margin,
                               bool interleaved, bool strict_ties) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, logits, stats, summary, coef] = forward_op().call(
        model_pred, ref_pred, target, ref_err, mask, pair_weight, beta, divergence, alpha, gamma, label_smoothing,
        err_reduction, logratio_clip, reduction, loss_type, ipo_margin, interleaved, strict_ties);
    // The backward needs the inputs it reads and O(B) coefficients: no activation-sized buffer is kept.
    ctx->save_for_backward({model_pred, target, mask.value_or(at::Tensor()), coef});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->mark_non_differentiable({logits, stats, summary, coef});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the statistics (a launch each on CUDA)
    return {loss, logits, stats, summary, coef};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(kForwardArgs);
    const at::Tensor& grad_loss = grads[0];
    if (grad_loss.defined() && ctx->needs_input_grad(0)) {
      const variable_list saved = ctx->get_saved_variables();
      const std::optional<at::Tensor> mask = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
      out[0] =
          backward_op().call(grad_loss, saved[0], saved[1], mask, saved[3], ctx->saved_data["interleaved"].toBool());
    }
    return out;
  }
};

fdpo::ForwardOutputs forward_autograd(const at::Tensor& model_pred, const std::optional<at::Tensor>& ref_pred,
                                      const at::Tensor& target, const std::optional<at::Tensor>& ref_err,
                                      const std::optional<at::Tensor>& mask,
                                      const std::optional<at::Tensor>& pair_weight, double beta, int64_t divergence,
                                      double alpha, double gamma, double label_smoothing, int64_t err_reduction,
                                      double logratio_clip, int64_t reduction, int64_t loss_type, double ipo_margin,
                                      bool interleaved, bool strict_ties) {
  const variable_list r = FdpoForward::apply(model_pred, ref_pred, target, ref_err, mask, pair_weight, beta, divergence,
                                             alpha, gamma, label_smoothing, err_reduction, logratio_clip, reduction,
                                             loss_type, ipo_margin, interleaved, strict_ties);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// The backward op differentiates once. Its own backward (a second derivative of the loss, e.g. a gradient
// penalty through torch.autograd.grad(create_graph=True)) would need terms the kernels do not compute: it
// raises instead of silently returning a wrong value.
class FdpoBackward : public torch::autograd::Function<FdpoBackward> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_loss, const at::Tensor& model_pred,
                               const at::Tensor& target, const std::optional<at::Tensor>& mask,
                               const at::Tensor& grad_coef, bool interleaved) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {backward_op().call(grad_loss, model_pred, target, mask, grad_coef, interleaved)};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "fdiv_kernels: double backward through fused_fdpo_loss is not supported (the fused kernels "
                "compute first derivatives only). For a loss on the gradient (create_graph=True), use "
                "fdiv_kernels.fdpo_loss_reference, whose gradient is differentiable.");
    return {};
  }
};

at::Tensor backward_autograd(const at::Tensor& grad_loss, const at::Tensor& model_pred, const at::Tensor& target,
                             const std::optional<at::Tensor>& mask, const at::Tensor& grad_coef, bool interleaved) {
  return FdpoBackward::apply(grad_loss, model_pred, target, mask, grad_coef, interleaved)[0];
}

}  // namespace

std::string fdpo_cpu_isa();  // fdpo_cpu.cpp

TORCH_LIBRARY(fdiv_kernels, m) {
  m.def(
      "fdpo_forward(Tensor model_pred, Tensor? ref_pred, Tensor target, Tensor? ref_err, Tensor? mask, "
      "Tensor? pair_weight, float beta, int divergence, float alpha, float gamma, float label_smoothing, "
      "int err_reduction, float logratio_clip, int reduction, int loss_type, float ipo_margin, bool interleaved, "
      "bool strict_ties) "
      "-> (Tensor loss, Tensor logits, Tensor sample_stats, Tensor summary, Tensor grad_coef)");
  m.def(
      "fdpo_backward(Tensor grad_loss, Tensor model_pred, Tensor target, Tensor? mask, Tensor grad_coef, "
      "bool interleaved) -> Tensor");
  // The CPU kernels' ISA copy in use ("avx2" or "generic"; FDIV_KERNELS_CPU_ISA=generic forces the latter).
  m.def("cpu_isa() -> str", &fdpo_cpu_isa);
}

TORCH_LIBRARY_IMPL(fdiv_kernels, Meta, m) {
  m.impl("fdpo_forward", &forward_meta);
  m.impl("fdpo_backward", &backward_meta);
}

TORCH_LIBRARY_IMPL(fdiv_kernels, Autograd, m) {
  m.impl("fdpo_forward", &forward_autograd);
  m.impl("fdpo_backward", &backward_autograd);
}

// An empty Python module, so that `import fdiv_kernels._C` loads this library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
