// The Python module vllm_qoq._C.  It has no Python-visible functions: importing it
// loads the shared library, whose static initializers register the CUDA kernels with
// the torch dispatcher (TORCH_LIBRARY_IMPL(qoq, CUDA, ...) in csrc/*/bindings.cpp).
#include <Python.h>

static struct PyModuleDef qoq_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "vllm_qoq CUDA kernels; use them through torch.ops.qoq (see vllm_qoq/ops.py)", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&qoq_c_module); }
