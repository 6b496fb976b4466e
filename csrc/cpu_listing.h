// Gradients listed for the CPU statistics pass while host_pass walks them.
//
// The pass reads, per tensor, its data pointer, element count and dtype: fields of its
// TensorImpl and storage that host_pass (csrc/host_path.cpp) has just read for the plan
// key. Listing them there, while those lines are cached, spares the pass's own listing a
// second round of cache misses over the same ~5 lines per tensor (and the element counts a
// third). The listing serves only the list the walk returned, unchanged (the same object
// holding the same items), and holds the tensors' storages, so the pass reads memory that
// stays allocated even when the tensors are dropped or given new storage meanwhile. A held
// storage can still swap its buffer (a tensor's resize_ past its storage's size reallocates
// it in place, freeing the old one): the listing records each storage's buffer and serves
// only while every one is unchanged.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <Python.h>

#include <vector>

#include "cpu_stats.h"

namespace gradstats {

// A plain CPU tensor's keys: any other (Python, Negative, Conjugate, ZeroTensor, functorch
// wrappers, another device) makes the dispatcher do more than call the CPU kernel.
inline bool plain_cpu_keys(const at::Tensor& t) {
  static const c10::DispatchKeySet plain({c10::DispatchKey::CPU,
                                          c10::DispatchKey::ADInplaceOrView,
                                          c10::DispatchKey::AutogradCPU,
                                          c10::DispatchKey::AutocastCPU});
  return plain.isSupersetOf(t.key_set());
}

struct CpuListing {
  PyObject* list = nullptr;        // the walk's result list (a reference held)
  std::vector<PyObject*> objects;  // its items when listed: compared, never dereferenced
  std::vector<ListedTensor> tensors;
  std::vector<c10::Storage> storages;  // held while the listing lives
  std::vector<const void*> buffers;     // each storage's buffer when listed
  ~CpuListing() { Py_XDECREF(list); }  // (dropped with its capsule, the GIL held)
};

// The capsule's name (PyCapsule checks it on every access).
inline constexpr const char* kCpuListingName = "gradstats._C.cpu_listing";

// A new capsule owning `listing` (nullptr and a Python error when it cannot be made; the
// listing is then freed).
PyObject* wrap_listing(CpuListing* listing);

// The listing in `capsule` when it lists `tensors`: the same list object, holding the same
// items; else nullptr (no Python error).
const CpuListing* listing_of(PyObject* capsule, PyObject* tensors);

// Whether every held storage still has the buffer it was listed with (reading a listed
// pointer is then safe). One read of each storage: ~8 ns a tensor.
bool buffers_unchanged(const CpuListing& listing);

}  // namespace gradstats
