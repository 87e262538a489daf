// pgext._C: build information, and the direct call behind pgext.pg_error. The
// ops themselves are dispatcher ops (torch.ops.pgext.*) that live in libpgext.
// This module links libpgext (the installed package: pgext/lib/libpgext.so,
// found through RUNPATH $ORIGIN/lib) and reaches it only through the same
// public C++ API that C++ programs use. Loading this module loads libpgext,
// whose static initializers register the ops, once per process.
#include <pgext/pgext.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/headeronly/version.h>

#include <string>
#include <string_view>
#include <utility>

namespace {

// The reduction named by a str, or false for anything else.
bool reduction_of(PyObject* name, pgext::Reduction& out) {
  if (!PyUnicode_Check(name)) {
    return false;
  }
  Py_ssize_t size = 0;
  const char* s = PyUnicode_AsUTF8AndSize(name, &size);
  if (s == nullptr) {
    PyErr_Clear();
    return false;
  }
  // The whole string: "mean\0x" is not 'mean' (torch.ops rejects it).
  const std::string_view text(s, static_cast<size_t>(size));
  for (auto r : {pgext::Reduction::Mean, pgext::Reduction::Sum, pgext::Reduction::None}) {
    if (text == pgext::reduction_name(r)) {
      out = r;
      return true;
    }
  }
  return false;
}

// Plain tensors only (torch.Tensor or nn.Parameter): a subclass may override
// __torch_function__, which only the torch.ops call honours.
bool is_plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj);
}

// _C.pg_error(loss_type, data, weight, reduction): pgext.pg_error for the
// common call, through the typed C++ API (pgext::pg_error, the same dispatcher
// op, autograd and kernels) instead of the boxed torch.ops call. At (64, 2)
// the boxed call's argument conversion and stack cost about as much as the
// whole forward, and its code footprint slowed the backward that follows by
// more again. Returns None, having done nothing, for any call it does not
// handle exactly like torch.ops.pgext.pg_error (anything but a 3-tuple of
// plain tensors, a weight that is not None or a plain tensor, an unknown
// reduction, an active torch function mode): pgext.pg_error then takes the
// torch.ops path, which also raises the argument errors.
PyObject* pg_error_direct(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "pgext._C.pg_error expects (loss_type, data, weight, reduction)");
    return nullptr;
  }
  PyObject* loss_type = args[0];
  PyObject* data = args[1];
  PyObject* weight = args[2];
  if (!PyType_Check(loss_type) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(loss_type), &PyTuple_Type)) {
    PyErr_SetString(PyExc_TypeError, "pgext._C.pg_error: loss_type must be a tuple type");
    return nullptr;
  }
  pgext::Reduction reduction{};
  if (!PyTuple_Check(data) || PyTuple_GET_SIZE(data) != 3 || !reduction_of(args[3], reduction) ||
      at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NONE;
  }
  PyObject* logit = PyTuple_GET_ITEM(data, 0);
  PyObject* action = PyTuple_GET_ITEM(data, 1);
  PyObject* ret = PyTuple_GET_ITEM(data, 2);
  if (!is_plain_tensor(logit) || !is_plain_tensor(action) || !is_plain_tensor(ret) ||
      (weight != Py_None && !is_plain_tensor(weight))) {
    Py_RETURN_NONE;
  }

  pgext::PgData in{THPVariable_Unpack(logit), THPVariable_Unpack(action), THPVariable_Unpack(ret)};
  pgext::PgOptions options;
  options.reduction = reduction;
  if (weight != Py_None) {
    options.weight = THPVariable_Unpack(weight);
  }
  pgext::PgLoss loss;
  {
    // As the torch.ops call does: other Python threads run during the kernels.
    pybind11::gil_scoped_release no_gil;
    loss = pgext::pg_error(in, options);
  }

  // pg_loss(policy_loss, entropy_loss), built as tuple.__new__ builds it.
  auto* type = reinterpret_cast<PyTypeObject*>(loss_type);
  PyObject* result = type->tp_alloc(type, 2);
  if (result == nullptr) {
    return nullptr;
  }
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(loss.policy_loss)));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(loss.entropy_loss)));
  if (PyTuple_GET_ITEM(result, 0) == nullptr || PyTuple_GET_ITEM(result, 1) == nullptr) {
    Py_DECREF(result);
    return nullptr;
  }
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef pg_error_def = {
    "pg_error", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&pg_error_direct)), METH_FASTCALL,
    "pg_error(loss_type, data, weight, reduction): pgext.pg_error's direct call; None where it "
    "does not apply (pgext.pg_error then calls torch.ops.pgext.pg_error)."};

// pgext.ActionOutOfRangeError, set by pgext's __init__ (a Python class, so
// that it pickles and reads like any other).
PyObject* action_error_type = nullptr;

// libpgext's handler for an action outside [0, N) (set_action_error_handler):
// raises pgext.ActionOutOfRangeError, carried through the dispatcher as a
// python_error, which every Python entry point of torch (torch.ops, this
// module's direct call) restores before any c10::Error translation.
[[noreturn]] void raise_action_error(const std::string& message) {
  pybind11::gil_scoped_acquire gil;
  PyErr_SetString(action_error_type, message.c_str());
  python_error error;
  error.persist();
  throw error;
}

void set_action_error_type(const pybind11::object& type) {
  if (!PyType_Check(type.ptr()) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(type.ptr()),
                                                     reinterpret_cast<PyTypeObject*>(PyExc_IndexError))) {
    throw pybind11::type_error("pgext._C._set_action_error_type expects a subclass of IndexError");
  }
  Py_XDECREF(action_error_type);
  action_error_type = pybind11::object(type).release().ptr();
  pgext::detail::set_action_error_handler(&raise_action_error);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgext build information and pg_error's direct call; the ops live in libpgext (torch.ops.pgext)";
  m.attr("__version__") = pgext::version();
  m.def("cuda_compiled", [] { return pgext::cuda_compiled(); },
        "Whether the CUDA kernels were compiled into libpgext.");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "The torch version this build was compiled against.");
  m.def("cpu_capability", [](at::ScalarType dtype) { return std::string(pgext::cpu_capability(dtype)); },
        pybind11::arg("dtype") = at::kFloat,
        "The CPU kernel build used for logits of this dtype: DEFAULT, AVX2 or AVX512 (ATen's choice), "
        "or AVX512_BF16 for bfloat16 on CPUs with those instructions.");
  m.def("_set_action_error_type", &set_action_error_type,
        "Makes the ops raise this exception type (pgext.ActionOutOfRangeError) for an action out of range.");
  PyObject* direct = PyCFunction_NewEx(&pg_error_def, nullptr, m.attr("__name__").ptr());
  if (direct == nullptr) {
    throw pybind11::error_already_set();
  }
  m.add_object("pg_error", pybind11::reinterpret_steal<pybind11::object>(direct));
}
