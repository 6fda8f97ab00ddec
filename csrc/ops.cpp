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
                                  const std::optional<at::Tensor>&, c10::ArrayRef<double> fparams,
                                  c10::ArrayRef<int64_t> iparams) {
  fdpo::check_layout("meta", fparams, iparams);
  return fdpo::empty_forward_outputs(model_pred, iparams[fdpo::IntParam::kReduction]);
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

class FdpoForward : public torch::autograd::Function<FdpoForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_pred,
                               const std::optional<at::Tensor>& ref_pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& pair_weight, c10::ArrayRef<double> fparams,
                               c10::ArrayRef<int64_t> iparams) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, logits, stats, summary, coef] =
        forward_op().call(model_pred, ref_pred, target, ref_err, mask, pair_weight, fparams, iparams);
    // The backward needs the inputs it reads and O(B) coefficients: no activation-sized buffer is kept.
    ctx->save_for_backward({model_pred, target, mask.value_or(at::Tensor()), coef});
    ctx->saved_data["interleaved"] = iparams[fdpo::IntParam::kInterleaved] != 0;
    ctx->mark_non_differentiable({logits, stats, summary, coef});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the statistics (a launch each on CUDA)
    return {loss, logits, stats, summary, coef};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // One gradient per input of the op: model_pred's, undefined for the others.
    variable_list out(forward_op().schema().arguments().size());
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
                                      const std::optional<at::Tensor>& pair_weight, c10::ArrayRef<double> fparams,
                                      c10::ArrayRef<int64_t> iparams) {
  const variable_list r =
      FdpoForward::apply(model_pred, ref_pred, target, ref_err, mask, pair_weight, fparams, iparams);
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
    // The same text as fdiv_kernels/ops.py DOUBLE_BACKWARD_ERROR (tests/test_ops.py checks both).
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
      // fparams, iparams: the configuration, laid out as fdpo_op.h FloatParam / IntParam.
      "fdpo_forward(Tensor model_pred, Tensor? ref_pred, Tensor target, Tensor? ref_err, Tensor? mask, "
      "Tensor? pair_weight, float[] fparams, int[] iparams) "
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
