// Schemas of the C++ ops behind backend="cpu" and backend="cuda" (docs/architecture.md, "The kernel contract").
// fdpo_cpu.cpp registers the CPU implementations, fdpo_cuda.cu the CUDA ones; fdiv_kernels/backends/cpp.py calls
// them from inside the Python custom ops, which own autograd, fake kernels and validation.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fdiv_kernels_C, m) {
  m.def(
      "forward(Tensor model_pred, Tensor? ref_pred, Tensor target, Tensor? ref_err, Tensor? mask, "
      "Tensor? pair_weight, float beta, int divergence, float alpha, float gamma, float label_smoothing, "
      "bool err_sum, float logratio_clip, int reduction, bool interleaved) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_loss, Tensor model_pred, Tensor target, Tensor? mask, Tensor grad_coef, "
      "bool interleaved) -> Tensor");
}

// An empty Python module, so that `import fdiv_kernels._C` loads this library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
