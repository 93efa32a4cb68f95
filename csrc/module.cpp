// The Python module deeparch_kernels._C. Its import registers the C++ and CUDA kernels with the
// dispatcher (TORCH_LIBRARY_IMPL blocks in the other sources); the schemas themselves are defined
// in Python (deeparch_kernels/ops/), so the package works, on its other backends, without this
// module. autograd.cpp also registers the C++ ops' Autograd kernels. build_info() lets Python detect a stale or mismatched build.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/types.h>

#include <cstring>

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

// same_bits(a, b): the tuples a and b hold, pairwise, None and None or CPU tensors of one dtype
// and shape whose bytes are equal (both contiguous; anything else: False). The eager BatchNorm
// fold check of the fused modules on the CPU (nn/folding.py), in one call instead of a
// torch.equal per tensor (~2 us each, five per layer). Equal bytes is the fold's own criterion:
// equal inputs give the same fold, NaN included.
static PyObject* same_bits(PyObject*, PyObject* args) {
  PyObject *a, *b;
  if (!PyArg_ParseTuple(args, "O!O!", &PyTuple_Type, &a, &PyTuple_Type, &b)) return nullptr;
  const Py_ssize_t n = PyTuple_GET_SIZE(a);
  if (PyTuple_GET_SIZE(b) != n) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* x = PyTuple_GET_ITEM(a, i);
    PyObject* y = PyTuple_GET_ITEM(b, i);
    if (x == Py_None || y == Py_None) {
      if (x != y) Py_RETURN_FALSE;
      continue;
    }
    if (!THPVariable_Check(x) || !THPVariable_Check(y)) {
      PyErr_SetString(PyExc_TypeError, "same_bits: tuples of tensors or None expected");
      return nullptr;
    }
    const at::Tensor& tx = THPVariable_Unpack(x);
    const at::Tensor& ty = THPVariable_Unpack(y);
    if (!tx.device().is_cpu() || !ty.device().is_cpu() || tx.scalar_type() != ty.scalar_type() ||
        tx.sizes() != ty.sizes() || !tx.is_contiguous() || !ty.is_contiguous() ||
        tx.layout() != at::kStrided || ty.layout() != at::kStrided) {
      Py_RETURN_FALSE;
    }
    const size_t nbytes = size_t(tx.numel()) * tx.element_size();
    if (nbytes && std::memcmp(tx.const_data_ptr(), ty.const_data_ptr(), nbytes) != 0) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {"same_bits", same_bits, METH_VARARGS, "Pairwise: both None, or equal bytes (CPU tensors)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "deeparch-kernels C++/CUDA kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
