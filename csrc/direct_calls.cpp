// The CPU statistics pass and element counts called on a Python list directly, beside the
// dispatcher, for eager calls on plain CPU tensors.
//
// Why: the dispatcher's boxed call of gradstats::cpu_stats copies every tensor of the list
// into an IValue and back. A copy of a tensor that has a Python object takes a reference
// on that object too, and dropping it takes the GIL's mutex: about 150 ns per tensor, 0.6
// ms of a 4,500-gradient call before any element is read. Here each tensor is read through
// its Python object (THPVariable_Unpack) with the GIL held, the pass is planned from that
// (StatsPass: the work list, the outputs, any error), and it runs with the GIL released,
// holding only the tensors' storages (see HeldStorages for why it must hold something).
//
// When it declines: it returns None, and the caller uses the registered op, for anything
// the dispatcher would treat differently from a plain CPU tensor: a tensor subclass, a
// torch function or dispatch mode, functorch transforms (any key in the thread's included
// set), negative or conjugate views, other devices: any dispatch key a plain CPU tensor
// lacks. Under torch.compile the caller never comes here (the op is what gets traced).

#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_listing.h"
#include "cpu_stats.h"

namespace gradstats {
namespace {

// A thread's included keys outside any mode or transform.
const c10::DispatchKeySet kAlwaysIncluded({c10::DispatchKey::BackendSelect,
                                           c10::DispatchKey::ADInplaceOrView});

// Whether no torch function mode, dispatch mode or functorch transform is in force: the
// op would then run code of theirs, which a direct call would skip.
bool outside_modes() {
  return !at::impl::torch_function_mode_enabled() &&
         kAlwaysIncluded.isSupersetOf(c10::impl::tls_local_dispatch_key_set().included_);
}

// The list's tensors, read under the GIL: pointers into their Python objects (no
// reference count moves; a copy of a tensor with a Python object would reference that
// object too, and dropping it takes the GIL's mutex).
class ListedTensors {
 public:
  // False when some item is not served here (see the header); the caller returns None.
  bool take(PyObject* items) {
    if (!PyList_Check(items) && !PyTuple_Check(items)) return false;
    if (!outside_modes()) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    PyObject** item = PySequence_Fast_ITEMS(items);
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_CheckExact(item[i])) return false;
      const at::Tensor& tensor = THPVariable_Unpack(item[i]);
      if (!tensor.defined() || !plain_cpu_keys(tensor)) return false;
      tensors_.push_back(&tensor);
    }
    return true;
  }
  const at::Tensor* const* data() const { return tensors_.data(); }
  int64_t size() const { return static_cast<int64_t>(tensors_.size()); }

 private:
  std::vector<const at::Tensor*> tensors_;
};

// The storages of tensors, held while a pass reads their data with the GIL released.
// Another thread may meanwhile change the list, drop the tensors, or give a tensor's
// TensorImpl to another object (torch.utils.swap_tensors swaps one that only its Python
// object holds) and free it: the pointers ListedTensors took are then dangling. A pass
// planned under the GIL (StatsPass) reads only the data, and a storage holds that memory
// (a reference to its StorageImpl: a few ns, no Python object involved, where a copy of
// each tensor cost ~50 ns).
class HeldStorages {
 public:
  explicit HeldStorages(const ListedTensors& tensors) {
    storages_.reserve(tensors.size());
    for (int64_t t = 0; t < tensors.size(); ++t) {
      storages_.push_back(tensors.data()[t]->storage());
    }
  }

 private:
  std::vector<c10::Storage> storages_;
};

// Releases the GIL for its scope (an exception thrown inside takes it back on the way out).
class WithoutGil {
 public:
  WithoutGil() : state_(PyEval_SaveThread()) {}
  ~WithoutGil() { PyEval_RestoreThread(state_); }

 private:
  PyThreadState* state_;
};

// The pass's options, the last four arguments of both pass calls: (p, norm_kind,
// num_bins, min_exp).
struct PassOptions {
  double p;
  long long norm_kind, num_bins, min_exp;

  // False with a Python error when an argument has the wrong type (read no further: a
  // conversion must not run with an error already set).
  bool read(PyObject* const* args) {
    p = PyFloat_AsDouble(args[0]);
    if (PyErr_Occurred()) return false;
    norm_kind = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return false;
    num_bins = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return false;
    min_exp = PyLong_AsLongLong(args[3]);
    return !PyErr_Occurred();
  }
};

// Runs a planned pass with the GIL released (whatever it reads held alive by the caller)
// and returns (power, nonfinite, hist) as a new tuple.
PyObject* run_without_gil(StatsPass& pass) {
  {
    WithoutGil released;
    // The dispatcher records every op call for torch.profiler; without this record the
    // pass would vanish from its traces. (No arguments: the profiler records a list's
    // shapes as empty anyway.) Inactive, it costs a thread-local read.
    RECORD_FUNCTION("gradstats::cpu_stats", std::vector<c10::IValue>());
    pass.run();
  }
  const auto outputs = pass.outputs();
  PyObject* parts[] = {THPVariable_Wrap(std::get<0>(outputs)),
                       THPVariable_Wrap(std::get<1>(outputs)),
                       THPVariable_Wrap(std::get<2>(outputs))};
  PyObject* result = nullptr;
  if (parts[0] != nullptr && parts[1] != nullptr && parts[2] != nullptr) {
    result = PyTuple_New(3);
  }
  if (result == nullptr) {
    for (PyObject* part : parts) Py_XDECREF(part);
    return nullptr;
  }
  for (Py_ssize_t j = 0; j < 3; ++j) PyTuple_SET_ITEM(result, j, parts[j]);  // steals
  return result;
}

// cpu_stats_list(tensors, p, norm_kind, num_bins, min_exp) -> (power, nonfinite, hist),
// what gradstats::cpu_stats returns, or None (see the header).
PyObject* cpu_stats_list(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError,
                    "cpu_stats_list(tensors, p, norm_kind, num_bins, min_exp) takes 5 arguments");
    return nullptr;
  }
  PassOptions options;
  if (!options.read(args + 1)) return nullptr;
  ListedTensors tensors;
  if (!tensors.take(args[0])) Py_RETURN_NONE;
  // Planned under the GIL (the tensors' metadata read, errors raised), run without it.
  StatsPass pass(tensors.data(), tensors.size(), options.p, options.norm_kind,
                 options.num_bins, options.min_exp);
  const HeldStorages held(tensors);  // dropped after the run, with the GIL
  return run_without_gil(pass);
  END_HANDLE_TH_ERRORS
}

// cpu_stats_listed(listing, tensors, p, norm_kind, num_bins, min_exp) -> what
// cpu_stats_list returns for `tensors`, from the listing host_pass made of them
// (csrc/cpu_listing.h), or None when the listing does not serve them (another list, a
// changed one) or a mode is in force: the caller then calls cpu_stats_list.
PyObject* cpu_stats_listed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "cpu_stats_listed(listing, tensors, p, norm_kind, "
                    "num_bins, min_exp) takes 6 arguments");
    return nullptr;
  }
  PassOptions options;
  if (!options.read(args + 2)) return nullptr;
  const CpuListing* listing = listing_of(args[0], args[1]);
  // A listed pointer into a buffer its storage has since replaced (and freed) would be
  // read after free; the direct call reads such a tensor as it is now.
  if (listing == nullptr || !outside_modes() || !buffers_unchanged(*listing)) Py_RETURN_NONE;
  StatsPass pass(listing->tensors.data(), static_cast<int64_t>(listing->tensors.size()),
                 options.p, options.norm_kind, options.num_bins, options.min_exp);
  // The listing holds the storages; the caller's reference to it lasts the call.
  return run_without_gil(pass);
  END_HANDLE_TH_ERRORS
}

// listing_numel(listing, tensors) -> the element counts of `tensors` as an int64 tensor,
// from the listing host_pass made of them (as walked: it reads no tensor memory, so a
// buffer replaced since does not matter here), or None (as cpu_stats_listed).
PyObject* listing_numel(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "listing_numel(listing, tensors) takes 2 arguments");
    return nullptr;
  }
  const CpuListing* listing = listing_of(args[0], args[1]);
  if (listing == nullptr || !outside_modes()) Py_RETURN_NONE;
  const auto n = static_cast<int64_t>(listing->tensors.size());
  at::Tensor numel = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = numel.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) out[t] = listing->tensors[t].numel;
  return THPVariable_Wrap(numel);
  END_HANDLE_TH_ERRORS
}

// numel_list(tensors) -> an int64 CPU tensor of their element counts, or None (see the
// header). map(Tensor.numel) is a Python call per tensor: 0.3 ms at 4,500 gradients.
PyObject* numel_list(PyObject* /*module*/, PyObject* items) {
  HANDLE_TH_ERRORS
  ListedTensors tensors;
  if (!tensors.take(items)) Py_RETURN_NONE;  // the GIL is kept
  at::Tensor numel = at::empty({tensors.size()}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = numel.data_ptr<int64_t>();
  for (int64_t t = 0; t < tensors.size(); ++t) out[t] = tensors.data()[t]->numel();
  return THPVariable_Wrap(numel);
  END_HANDLE_TH_ERRORS
}

// How many tensors ahead bump_versions fetches each level of its pointer chain.
constexpr Py_ssize_t kBumpAhead = 4;

// bump_versions(tensors) -> True, after bumping each tensor's version counter as torch's
// in-place ops do (inference tensors have none: skipped, as torch skips them), or None,
// doing nothing, when some item is not a tensor. For writes torch does not see (the Triton
// kernels'): torch.autograd.graph.increment_version converts the list to tensors first,
// 390 us at 4,500 gradients (a reference moved per tensor, see the header), here ~40 us.
PyObject* bump_versions(PyObject* /*module*/, PyObject* items) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(items) && !PyTuple_Check(items)) Py_RETURN_NONE;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  PyObject** item = PySequence_Fast_ITEMS(items);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(item[i])) Py_RETURN_NONE;
  }
  // The check above brought every object in; each bump then waits on two misses (the
  // TensorImpl, then its version counter), so both are fetched ahead: the TensorImpl
  // 2 kBumpAhead items ahead, the counter it points to kBumpAhead items ahead (written
  // next: fetched for writing). 4,500 tensors just walked by host_pass: 49 -> 42 us; with
  // every line cached, 35 us either way (the atomic increments).
  const auto impl_of = [&](Py_ssize_t j) {
    return THPVariable_Unpack(item[j]).unsafeGetTensorImpl();
  };
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + 2 * kBumpAhead < n) {
      const c10::TensorImpl* impl = impl_of(i + 2 * kBumpAhead);
      __builtin_prefetch(&impl->version_counter());
      __builtin_prefetch(reinterpret_cast<const char*>(impl) + sizeof(c10::TensorImpl) - 1);
    }
    if (i + kBumpAhead < n) {
      // VariableVersion is one pointer, to the shared counter (only prefetched here).
      static_assert(sizeof(c10::VariableVersion) == sizeof(void*));
      __builtin_prefetch(
          *reinterpret_cast<void* const*>(&impl_of(i + kBumpAhead)->version_counter()), 1);
    }
    const at::Tensor& tensor = THPVariable_Unpack(item[i]);
    if (tensor.defined() && !tensor.is_inference()) {
      tensor.unsafeGetTensorImpl()->bump_version();
    }
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// new_tensors(device, specs) -> a tuple of new tensors on `device`, one per spec, a
// tuple (shape, dtype, zeroed) (shape: a tuple of ints; zeroed: filled with zeros, else
// uninitialised), or None under a torch function mode (which torch.empty would consult).
// The outputs of a call in one Python call: torch.empty costs 1.2-2 us from Python, most
// of it parsing its arguments, and a clip call makes eight. Made through the dispatcher
// (at::empty, at::zeros), as torch.empty makes them: same allocator, stream, dispatch modes.
PyObject* new_tensors(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !THPDevice_Check(args[0]) || !PyTuple_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "new_tensors(device, specs) takes a torch.device and a "
                    "tuple of (shape, dtype, zeroed) tuples");
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;
  const at::Device device = reinterpret_cast<THPDevice*>(args[0])->device;
  PyObject* specs = args[1];
  const Py_ssize_t count = PyTuple_GET_SIZE(specs);
  std::vector<at::Tensor> made;
  made.reserve(static_cast<size_t>(count));
  std::vector<int64_t> shape;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* spec = PyTuple_GET_ITEM(specs, i);
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 3 ||
        !PyTuple_Check(PyTuple_GET_ITEM(spec, 0)) || !THPDtype_Check(PyTuple_GET_ITEM(spec, 1))) {
      PyErr_SetString(PyExc_TypeError, "new_tensors: each spec is (shape, dtype, zeroed)");
      return nullptr;
    }
    PyObject* dims = PyTuple_GET_ITEM(spec, 0);
    shape.clear();
    for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(dims); ++d) {
      const long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(dims, d));
      if (size == -1 && PyErr_Occurred()) return nullptr;
      shape.push_back(static_cast<int64_t>(size));
    }
    const int zeroed = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 2));
    if (zeroed < 0) return nullptr;
    const at::ScalarType dtype =
        reinterpret_cast<THPDtype*>(PyTuple_GET_ITEM(spec, 1))->scalar_type;
    const auto options = at::TensorOptions().dtype(dtype).device(device);
    made.push_back(zeroed ? at::zeros(shape, options) : at::empty(shape, options));
  }
  PyObject* result = PyTuple_New(count);
  if (result == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* tensor = THPVariable_Wrap(std::move(made[static_cast<size_t>(i)]));
    if (tensor == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyTuple_SET_ITEM(result, i, tensor);  // steals
  }
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"cpu_stats_list",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(cpu_stats_list)),
     METH_FASTCALL,
     "cpu_stats_list(tensors, p, norm_kind, num_bins, min_exp): gradstats::cpu_stats on a "
     "list of plain CPU tensors without the dispatcher, or None"},
    {"bump_versions", bump_versions, METH_O,
     "bump_versions(tensors): bump each tensor's version counter; None if one is no tensor"},
    {"new_tensors",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(new_tensors)),
     METH_FASTCALL,
     "new_tensors(device, specs): new tensors, one per (shape, dtype, zeroed), or None"},
    {"numel_list", numel_list, METH_O,
     "numel_list(tensors): their element counts as an int64 tensor, or None"},
    {"cpu_stats_listed",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(cpu_stats_listed)),
     METH_FASTCALL,
     "cpu_stats_listed(listing, tensors, p, norm_kind, num_bins, min_exp): cpu_stats_list "
     "from host_pass's listing of tensors, or None"},
    {"listing_numel",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(listing_numel)),
     METH_FASTCALL,
     "listing_numel(listing, tensors): element counts from host_pass's listing, or None"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyObject* wrap_listing(CpuListing* listing) {
  PyObject* capsule = PyCapsule_New(listing, kCpuListingName, [](PyObject* object) {
    delete static_cast<CpuListing*>(PyCapsule_GetPointer(object, kCpuListingName));
  });
  if (capsule == nullptr) delete listing;
  return capsule;
}

const CpuListing* listing_of(PyObject* capsule, PyObject* tensors) {
  if (!PyCapsule_IsValid(capsule, kCpuListingName)) return nullptr;
  const auto* listing =
      static_cast<const CpuListing*>(PyCapsule_GetPointer(capsule, kCpuListingName));
  if (tensors != listing->list) return nullptr;
  const auto n = static_cast<size_t>(PyList_GET_SIZE(tensors));
  if (n != listing->objects.size() || n != listing->tensors.size()) return nullptr;
  PyObject* const* items = PySequence_Fast_ITEMS(tensors);
  return std::equal(items, items + n, listing->objects.begin()) ? listing : nullptr;
}

bool buffers_unchanged(const CpuListing& listing) {
  for (size_t s = 0; s < listing.storages.size(); ++s) {
    if (listing.storages[s].data_ptr().get() != listing.buffers[s]) return false;
  }
  return true;
}

// The direct calls of gradstats._C (its module is created in cpu_stats.cpp).
PyMethodDef* direct_call_methods() {
  return methods;
}

}  // namespace gradstats
