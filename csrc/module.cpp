// Python module entry point, so that the ahead-of-time build (setup.py with TEMPNET_BUILD_CPP=1)
// can be imported as `tempnet._C`. Importing it loads the library, whose TORCH_LIBRARY_FRAGMENT
// blocks register the tempnet_cpp ops; the module itself has no attributes. The just-in-time
// build loads the same library with torch.ops.load_library and never calls this function.

#include <Python.h>

#define TEMPNET_CONCAT_IMPL(a, b) a##b
#define TEMPNET_CONCAT(a, b) TEMPNET_CONCAT_IMPL(a, b)

static PyModuleDef tempnet_module = {PyModuleDef_HEAD_INIT, "tempnet_cpp", "tempnet C++ ops (torch.ops.tempnet_cpp)",
                                     -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC TEMPNET_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&tempnet_module); }
