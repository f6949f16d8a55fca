// The one place that registers enginepy's C++ ops: schemas in TORCH_LIBRARY, kernels per device in
// TORCH_LIBRARY_IMPL. Shape stubs (fake kernels) for torch.compile live in enginepy/delay_ops.py and
// enginepy/cpu_linear.py.
#include "cpu_linear.h"
#include "ops.h"

#include <torch/library.h>

TORCH_LIBRARY(enginepy, m) {
  // Fake kernels are registered from Python; naming the module lets torch tell a C++ caller to import it.
  m.set_python_module("enginepy.delay_ops");
  m.def("delay_scatter(Tensor codes, Tensor delays, int special) -> Tensor");
  m.def("delay_gather(Tensor pattern, Tensor delays) -> Tensor");
  m.def("delay_step_input(Tensor codes, Tensor step, Tensor lengths, Tensor delays, int special) -> Tensor");
  m.def(
      "delay_step_write(Tensor(a!) codes, Tensor tokens, Tensor step, Tensor lengths, Tensor prompt_lengths, "
      "Tensor delays) -> ()");

  // CPU skinny GEMM over pre-packed bf16 / int8 weights (csrc/cpu_linear.h); fake kernels in enginepy/cpu_linear.py.
  m.set_python_module("enginepy.cpu_linear");
  m.def("cpu_linear_pack(Tensor weight, str kind) -> (Tensor, Tensor)");
  m.def(
      "cpu_linear(Tensor x, Tensor packed, Tensor? scale, int out_features, Tensor? bias=None, "
      "Tensor? residual=None, bool gelu=False, str isa='auto', int x_passes=2) -> Tensor");
  m.def("cpu_linear_isas(str kind) -> str", &enginepy::cpu_linear_isas);
}

TORCH_LIBRARY_IMPL(enginepy, CPU, m) {
  m.impl("delay_scatter", &enginepy::delay_scatter_cpu);
  m.impl("delay_gather", &enginepy::delay_gather_cpu);
  m.impl("delay_step_input", &enginepy::delay_step_input_cpu);
  m.impl("delay_step_write", &enginepy::delay_step_write_cpu);
  m.impl("cpu_linear_pack", &enginepy::cpu_linear_pack);
  m.impl("cpu_linear", &enginepy::cpu_linear);
}

#ifdef ENGINEPY_WITH_CUDA
TORCH_LIBRARY_IMPL(enginepy, CUDA, m) {
  m.impl("delay_scatter", &enginepy::delay_scatter_cuda);
  m.impl("delay_gather", &enginepy::delay_gather_cuda);
  m.impl("delay_step_input", &enginepy::delay_step_input_cuda);
  m.impl("delay_step_write", &enginepy::delay_step_write_cuda);
}
#endif

// Built as the Python module enginepy._C (setup.py defines TORCH_EXTENSION_NAME), the library only
// needs an empty module: importing it runs the registrations above. Plain C API, so no pybind11 and
// no libtorch_python are needed.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

#define ENGINEPY_CONCAT_IMPL(a, b) a##b
#define ENGINEPY_CONCAT(a, b) ENGINEPY_CONCAT_IMPL(a, b)
#define ENGINEPY_STRING_IMPL(x) #x
#define ENGINEPY_STRING(x) ENGINEPY_STRING_IMPL(x)

PyMODINIT_FUNC ENGINEPY_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      ENGINEPY_STRING(TORCH_EXTENSION_NAME),
      "enginepy's C++/CUDA delay-pattern ops, registered as torch.ops.enginepy.* on import.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
#endif
