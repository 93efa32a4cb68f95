// The Python module deeparch_kernels._C. Its import registers the C++ and CUDA kernels with the
// dispatcher (TORCH_LIBRARY_IMPL blocks in the other sources); the schemas themselves are defined
// in Python (deeparch_kernels/ops/), so the package works, on its other backends, without this
// module. autograd.cpp also registers the C++ ops' Autograd kernels. build_info() lets Python detect a stale or mismatched build.
#include <Python.h>
#include <torch/types.h>

#include "common.h"

#ifndef DEEPARCH_WITH_CUDA
#define DEEPARCH_WITH_CUDA 0
#endif
#ifndef DEEPARCH_WITH_CUTLASS
#define DEEPARCH_WITH_CUTLASS 0
#endif
#ifndef DEEPARCH_TORCH_MAJOR
#define DEEPARCH_TORCH_MAJOR 0
#define DEEPARCH_TORCH_MINOR 0
#endif

static PyObject* build_info(PyObject*, PyObject*) {
  // The torch major.minor the extension was compiled against: its ABI is not stable across them.
  // cpp_autograd: autograd.cpp registered the Autograd kernels of add_relu and fused_conv2d,
  // so Python must not register its own (ops/__init__.py).
  // cutlass: the CUTLASS sm_90a conv kernels (csrc/cuda/cutlass/) were compiled in.
  // winograd: the CPU Winograd kernel (csrc/cpu/winograd.cpp, AVX2 + FMA) was compiled in.
  return Py_BuildValue("{s:i,s:O,s:(ii),s:O,s:O,s:O}", "api_version", DEEPARCH_API_VERSION,
                       "cuda", DEEPARCH_WITH_CUDA ? Py_True : Py_False, "torch_version",
                       DEEPARCH_TORCH_MAJOR, DEEPARCH_TORCH_MINOR, "cpp_autograd", Py_True,
                       "cutlass", DEEPARCH_WITH_CUTLASS ? Py_True : Py_False, "winograd",
                       DEEPARCH_WINOGRAD ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "deeparch-kernels C++/CUDA kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
