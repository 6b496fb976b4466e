// The host path of a call, in one walk over a Python list: parameters (or tensors) ->
// gradients -> the facts routing needs (device, dtypes, contiguity) and an exact plan key.
//
// Python reads five or six attributes of every tensor per step, each a Python call
// (50-100 ns), and at 4,500 gradients that is most of a call's host time. Here each read
// is a field of the TensorImpl: a few ns per tensor, the walk dominated by cache misses.
//
// What it reads: a list or tuple of torch.Tensor / nn.Parameter objects. What it returns:
// see host_pass below. It knows nothing of plans, backends or error texts: any input it
// does not fully understand (a tensor subclass, a torch function mode, a layout it cannot
// describe, a tensor whose data cannot be read) returns None, and the caller takes the
// Python path, which behaves (and fails) exactly as it always did.
//
// The plan key is exact: the returned bytes hold, per tensor, its dtype, layout, device,
// contiguity, address and element count, the sizes and strides of any tensor that is not
// contiguous or shares its address with another listed tensor, and for sparse tensors
// which earlier position holds the same tensor (what Python's worklist.plan_key holds), so
// equal bytes mean equal metadata and equal update targets (worklist.update_targets
// updates a view listed twice once, and a sparse tensor listed twice once). The 64-bit
// hash beside them (of the fields that change between lists) only spares Python from
// hashing the bytes; a dictionary hit still compares them.

#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>

#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpu_listing.h"

namespace gradstats {
namespace {

// Bits of the flags host_pass returns (mirrored in gradstats/dispatch.py).
constexpr long kSingleDevice = 1;   // every tensor on the first one's device
constexpr long kAllContiguous = 4;  // every tensor strided and contiguous

// The key's layout. One record per tensor: a header word, then a part whose length the
// header and the part's own ndim word fix (strided: address, count, then, unless
// contiguous, ndim, ndim sizes and ndim strides; other layouts: the position of its first
// occurrence in the list, ndim, ndim sizes). When some address occurs twice, a trailer
// follows the records: kTrailerMark, then for each strided tensor whose address occurs
// more than once, in order: its position, ndim, sizes, strides. Header words never have
// the top bit set, so the mark cannot be read as a record: equal byte strings decode to
// equal metadata. (ndim has a word of its own: torch allows hundreds of dimensions.)
constexpr uint64_t kTrailerMark = uint64_t{1} << 63;
// A non-strided tensor's entry among the addresses: none (data_ptr is never all ones).
constexpr uint64_t kNoAddress = ~uint64_t{0};

uint64_t header_word(const at::Tensor& t, bool contiguous) {
  const c10::Device device = t.device();
  return static_cast<uint64_t>(static_cast<uint8_t>(t.scalar_type())) |
         static_cast<uint64_t>(static_cast<uint8_t>(t.layout())) << 8 |
         static_cast<uint64_t>(static_cast<uint8_t>(device.type())) << 16 |
         static_cast<uint64_t>(static_cast<uint16_t>(device.index() + 1)) << 24 |
         static_cast<uint64_t>(contiguous) << 40;
}

// Folds one word into a running hash: a hash_combine step, then one xorshift-multiply
// round of splitmix64's finaliser, so every input bit moves many output bits.
inline uint64_t mix(uint64_t h, uint64_t x) {
  h ^= x + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h ^= h >> 31;
  h *= 0xbf58476d1ce4e5b9ULL;
  return h;
}

// The dtype sets seen so far, as frozensets of torch.dtype, by bit mask of ScalarType.
// A process sees a handful; the references are kept for its lifetime.
PyObject* dtype_set(uint64_t mask) {
  static std::unordered_map<uint64_t, PyObject*> sets;
  auto found = sets.find(mask);
  if (found != sets.end()) {
    Py_INCREF(found->second);
    return found->second;
  }
  PyObject* members = PyList_New(0);
  if (members == nullptr) return nullptr;
  for (int i = 0; i < 64; ++i) {
    if (!(mask >> i & 1)) continue;
    auto* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(static_cast<at::ScalarType>(i)));
    if (PyList_Append(members, dtype) < 0) {
      Py_DECREF(members);
      return nullptr;
    }
  }
  PyObject* set = PyFrozenSet_New(members);
  Py_DECREF(members);
  if (set == nullptr) return nullptr;
  // The allocations above may collect garbage, and a finaliser that calls host_pass may
  // have added this mask already: keep one set, drop the other.
  const auto [entry, added] = sets.emplace(mask, set);
  if (!added) Py_DECREF(set);
  Py_INCREF(entry->second);
  return entry->second;
}

// Whether the walk can describe this layout: strided, or a sparse layout whose sizes
// are plain (the Python key records those by layout and shape too).
bool describable(c10::Layout layout) {
  switch (layout) {
    case c10::kStrided:
    case c10::kSparse:
    case c10::kSparseCsr:
    case c10::kSparseCsc:
    case c10::kSparseBsr:
    case c10::kSparseBsc:
      return true;
    default:
      return false;
  }
}

// What one walk collects. Kept between calls (the GIL is held), so a warm call allocates
// nothing here; a walk that starts while another is running (a finaliser that calls back
// in during THPVariable_Wrap) uses its own.
struct Walk {
  std::vector<uint64_t> words;      // the key's bytes
  std::vector<Py_ssize_t> kept;     // positions in items that gave a tensor
  std::vector<PyObject*> tensors;   // new references, handed to the result list
  std::vector<uint64_t> addresses;  // per tensor: data_ptr, or kNoAddress if not strided
  std::vector<uint64_t> address_table;  // scratch of has_repeated_address
  // Non-strided tensors seen (rare): each object's first position among the tensors.
  std::unordered_map<PyObject*, uint64_t> first_positions;
  uint64_t hash = 0, hash2 = 0;
  uint64_t dtypes = 0;              // bit mask of ScalarType
  long flags = 0;
  c10::Device first_device{c10::kCPU};
  bool busy = false;
  // Asked for, and every tensor so far is one the CPU pass reads (see csrc/cpu_listing.h):
  // each one's ListedTensor and storage.
  bool listing = false;
  std::vector<ListedTensor> listed;
  std::vector<c10::Storage> held;
  std::vector<const void*> buffers;  // each held storage's buffer as listed

  void reset() {
    words.clear();
    kept.clear();
    tensors.clear();
    addresses.clear();
    if (!first_positions.empty()) first_positions.clear();
    hash = 0x243f6a8885a308d3ULL;
    hash2 = 0x13198a2e03707344ULL;
    dtypes = 0;
    flags = kSingleDevice | kAllContiguous;
    first_device = c10::Device(c10::kCPU);
  }

  void release_tensors() {
    for (PyObject* t : tensors) Py_DECREF(t);
    tensors.clear();
  }

  void drop_listing() {
    listing = false;
    listed.clear();
    held.clear();
    buffers.clear();
  }
};

enum class Outcome { kDescribed, kNotDescribed, kPythonError };

void push_shape(std::vector<uint64_t>& words, const at::Tensor& t, bool with_strides) {
  const int64_t ndim = t.dim();
  const auto sizes = t.sizes();
  words.push_back(static_cast<uint64_t>(ndim));
  for (int64_t d = 0; d < ndim; ++d) words.push_back(static_cast<uint64_t>(sizes[d]));
  if (!with_strides) return;
  const auto strides = t.strides();
  for (int64_t d = 0; d < ndim; ++d) words.push_back(static_cast<uint64_t>(strides[d]));
}

// Lists a strided tensor for the CPU pass, or gives the listing up for this walk when the
// pass cannot read it (a walk over CUDA gradients gives it up at the first one).
void list_for_cpu_pass(Walk& walk, const at::Tensor& t, uint64_t address, uint64_t numel) {
  if (!plain_cpu_keys(t) || !pass_reads(t)) {
    walk.drop_listing();
    return;
  }
  walk.listed.push_back({numel == 0 ? nullptr : reinterpret_cast<const void*>(address),
                         static_cast<int64_t>(numel), t.scalar_type()});
  walk.held.push_back(t.storage());
  walk.buffers.push_back(walk.held.back().data_ptr().get());
}

// Appends one tensor's record to the key and its facts to the walk's summary. `object`
// is the tensor's Python object, which the walk holds. kListing: the walk lists for the
// CPU pass (a template argument: a walk without the listing, the GPU path's, keeps the
// code it had before the listing existed, ~1-2 ns a tensor faster).
// (flatten: everything it calls inlined, as when it had one caller and g++ chose so; two
// instantiations left header_word and vector::push_back out of line, 8% of a walk.)
template <bool kListing>
__attribute__((noinline, flatten)) void describe(Walk& walk, PyObject* object,
                                                 const at::Tensor& t) {
  const c10::Layout layout = t.layout();
  const c10::Device device = t.device();
  if (walk.tensors.size() == 1) {
    walk.first_device = device;
  } else if (device != walk.first_device) {
    walk.flags &= ~kSingleDevice;
  }
  walk.dtypes |= uint64_t{1} << static_cast<int>(t.scalar_type());
  const bool strided = layout == c10::kStrided;
  const bool contiguous = strided && t.is_contiguous();
  if (!contiguous) walk.flags &= ~kAllContiguous;
  const uint64_t header = header_word(t, contiguous);
  walk.words.push_back(header);
  if (strided) {
    // data_ptr(), as Python's Tensor.data_ptr() reads it (a copy-on-write tensor
    // materialises first, so the address is the one a kernel will write).
    const auto address = reinterpret_cast<uint64_t>(t.data_ptr());
    const auto numel = static_cast<uint64_t>(t.numel());
    walk.words.push_back(address);
    walk.words.push_back(numel);
    walk.addresses.push_back(address);
    // A contiguous tensor's memory is fixed by address, count and dtype, which is all a
    // plan reads (a reshaped gradient keeps its plan, as with Python's key), unless
    // another listed tensor has its address (the trailer, see add_shared_addresses); a
    // gapped or permuted view can share address and count with a dense one, so its shape
    // and strides are part of the key.
    if (!contiguous) push_shape(walk.words, t, true);
    walk.hash = mix(walk.hash, address);
    walk.hash2 = mix(walk.hash2, header ^ (numel << 8));
    if (kListing && walk.listing) list_for_cpu_pass(walk, t, address, numel);
  } else {
    if (kListing) walk.drop_listing();
    // A sparse tensor owns its values and is updated once however often it is listed
    // (by identity), so the key says which positions hold the same tensor object.
    const auto position = static_cast<uint64_t>(walk.tensors.size() - 1);
    const uint64_t first = walk.first_positions.emplace(object, position).first->second;
    walk.words.push_back(first);
    push_shape(walk.words, t, false);
    walk.addresses.push_back(kNoAddress);
    walk.hash2 = mix(walk.hash2, header ^ (first << 8));
  }
}

// Whether a strided tensor's address occurs twice in `addresses` (kNoAddress entries are
// skipped). An open-addressing set, at most two-thirds full, in `table`: about 2 us at
// 4,500 tensors (the walk: about 100 us), so the common case, no address twice, stays cheap.
bool has_repeated_address(const std::vector<uint64_t>& addresses,
                          std::vector<uint64_t>& table) {
  size_t capacity = 16;
  while (2 * capacity < 3 * addresses.size()) capacity *= 2;
  table.assign(capacity, 0);  // 0: an empty slot, so address 0 is counted apart
  const int shift = 64 - __builtin_ctzll(capacity);
  bool zero_seen = false;
  for (const uint64_t address : addresses) {
    if (address == kNoAddress) continue;
    if (address == 0) {
      if (zero_seen) return true;
      zero_seen = true;
      continue;
    }
    size_t slot = (address * 0x9e3779b97f4a7c15ULL) >> shift;
    while (table[slot] != 0) {
      if (table[slot] == address) return true;
      slot = (slot + 1) & (capacity - 1);
    }
    table[slot] = address;
  }
  return false;
}

// The key's trailer (see kTrailerMark), when some address occurs twice: the shape and
// strides of every tensor sharing its address decide whether the update treats them as
// one view (worklist._first_of_each_view), so they are part of the key. Rare; not fast.
void add_shared_addresses(Walk& walk) {
  if (!has_repeated_address(walk.addresses, walk.address_table)) return;
  std::vector<std::pair<uint64_t, size_t>> by_address;
  for (size_t j = 0; j < walk.addresses.size(); ++j) {
    if (walk.addresses[j] != kNoAddress) by_address.emplace_back(walk.addresses[j], j);
  }
  std::sort(by_address.begin(), by_address.end());
  std::vector<size_t> shared;
  for (size_t j = 0; j < by_address.size(); ++j) {
    const bool repeated =
        (j > 0 && by_address[j - 1].first == by_address[j].first) ||
        (j + 1 < by_address.size() && by_address[j + 1].first == by_address[j].first);
    if (repeated) shared.push_back(by_address[j].second);
  }
  std::sort(shared.begin(), shared.end());
  const size_t trailer_start = walk.words.size();
  walk.words.push_back(kTrailerMark);
  for (const size_t j : shared) {
    walk.words.push_back(static_cast<uint64_t>(j));
    push_shape(walk.words, THPVariable_Unpack(walk.tensors[j]), true);
  }
  for (size_t w = trailer_start; w < walk.words.size(); ++w) {
    walk.hash2 = mix(walk.hash2, walk.words[w]);
  }
}

// Tensor::grad(), with its two virtual calls and leaf check taken only when there is no
// gradient (where it warns for a non-leaf tensor, as Python's .grad does).
const at::Tensor& grad_of(const at::Tensor& param) {
  // The only AutogradMetaInterface there is (torch's impl::get_autograd_meta casts so).
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(
      param.unsafeGetTensorImpl()->autograd_meta());
  if (meta != nullptr && meta->grad_.defined()) return meta->grad_;
  return param.grad();
}

// The gradient's Python object, as .grad returns it (a new reference), or nullptr with
// no Python error set when the parameter has no gradient.
inline PyObject* gradient_object(PyObject* param) {
  const at::Tensor& grad = grad_of(THPVariable_Unpack(param));
  if (!grad.defined()) return nullptr;
  // The common case: the gradient has its Python object, which THPVariable_Wrap returns
  // with one more reference (torch 2.13: no other branch there runs Python code or
  // allocates). Wrapping by reference spares a copy of the at::Tensor, whose atomic
  // reference count increment and decrement (each also taking and dropping a reference
  // on that Python object) were a third of the walk.
  if (grad.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj() != nullptr) {
    return THPVariable_Wrap(grad);
  }
  // A new Python object: making it may run the garbage collector, and a finaliser that
  // sets p.grad = None would free the gradient while THPVariable_Wrap still reads it, so
  // it wraps an owned copy, taken with the parameter held (released however Wrap ends).
  const THPObjectPtr held(Py_NewRef(param));
  const at::Tensor owned = grad;
  return THPVariable_Wrap(owned);
}

// How far ahead of the walk, in items, each level of its pointer chain is fetched (see
// read_ahead). On a 2-core Xeon at 4,500 gradients, 3 walked 4-6% faster than 4, 6 and
// 2 (two builds run at once, one per core, the cores swapped between pairs); fetching 16
// items level by level before walking them was 50% slower, and no read-ahead 45%.
constexpr Py_ssize_t kAhead = 3;

// Fetches every line of a heap object. Heap objects are 16-byte aligned, so an object's
// fields can straddle one line more than its size suggests: its last byte is fetched too.
template <typename T>
inline void prefetch_object(const T* object) {
  const char* bytes = reinterpret_cast<const char*>(object);
  for (size_t offset = 0; offset < sizeof(T); offset += 64) __builtin_prefetch(bytes + offset);
  __builtin_prefetch(bytes + sizeof(T) - 1);
}

// The TensorImpl the walk describes for an item: its own, or with take_grad its
// gradient's; nullptr when it has none or is no plain tensor.
inline c10::TensorImpl* gradient_impl(PyObject* item, bool take_grad) {
  if (!THPVariable_CheckExact(item)) return nullptr;
  c10::TensorImpl* impl = THPVariable_Unpack(item).unsafeGetTensorImpl();
  if (!take_grad) return impl;
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
  return meta != nullptr && meta->grad_.defined() ? meta->grad_.unsafeGetTensorImpl() : nullptr;
}

// Walking 4,500 gradients touches some 30,000 cache lines in separate heap objects
// (parameter object -> its TensorImpl -> autograd metadata -> gradient TensorImpl -> its
// storage and Python object). One tensor at a time, each miss waits for the one before it.
// Here, before item i is walked, each level of the chain is fetched for a later item, one
// level further every kAhead items (with gradients: item i + 5 kAhead's object, i +
// 4 kAhead's TensorImpl, ..., i + kAhead's storage and gradient object). Each level
// follows pointers that the level before fetched kAhead items earlier, so the misses of
// several items are in flight at once and the walk finds its lines cached. Only reads
// and prefetches, of objects the list holds, with no Python code running in between: what
// the walk returns comes from the public Tensor API, as before. Forced inline: g++ 12
// counts a prefetch as no side effect, and may find an inline function that only reads
// and prefetches "pure" and delete its calls before inlining it (no warning, no prefetch
// left in the build: met in a planning loop's read-ahead, which was not kept).
__attribute__((always_inline)) inline void read_ahead(PyObject* const* items, Py_ssize_t size,
                                                     Py_ssize_t i, bool take_grad) {
  Py_ssize_t level = take_grad ? 5 : 3;  // the farthest item's level
  const auto next_item = [&]() -> PyObject* {
    const Py_ssize_t j = i + level-- * kAhead;
    return j < size ? items[j] : nullptr;
  };
  if (PyObject* object = next_item()) prefetch_object(reinterpret_cast<THPVariable*>(object));
  if (PyObject* object = next_item(); object != nullptr && THPVariable_CheckExact(object)) {
    const c10::TensorImpl* impl = THPVariable_Unpack(object).unsafeGetTensorImpl();
    if (take_grad) {
      // Of a parameter's TensorImpl the walk reads one field, its autograd metadata (the
      // field after its storage in torch's TensorImpl; in another order this fetch would
      // only miss): one line, not the three or four of the whole object. The walk is
      // bound by how many lines can be in flight at once: 16% faster.
      __builtin_prefetch(&impl->unsafe_storage() + 1);
    } else {
      prefetch_object(impl);
    }
  }
  if (take_grad) {
    if (PyObject* object = next_item(); object != nullptr && THPVariable_CheckExact(object)) {
      const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(
          THPVariable_Unpack(object).unsafeGetTensorImpl()->autograd_meta());
      if (meta != nullptr) __builtin_prefetch(&meta->grad_);
    }
    if (PyObject* object = next_item()) {
      if (const c10::TensorImpl* grad = gradient_impl(object, true)) prefetch_object(grad);
    }
  }
  if (PyObject* object = next_item()) {
    if (const c10::TensorImpl* impl = gradient_impl(object, take_grad)) {
      // (A sparse tensor has no storage.)
      if (const auto* storage = impl->unsafe_storage().unsafeGetStorageImpl()) {
        prefetch_object(storage);
      }
      if (take_grad) __builtin_prefetch(impl->pyobj_slot()->load_pyobj());
    }
  }
}

// Walks items[first, end). kListing: listing for the CPU pass (see describe); a walk that
// gives the listing up (at its first tensor, on CUDA gradients) goes on without it.
template <bool kListing>
Outcome walk_items(Walk& walk, PyObject* items, bool take_grad, Py_ssize_t first = 0) {
  // Every read below either succeeds or throws; a throw means Python's path should run
  // (and raise its own error), so it is caught as "not described".
  try {
    // Size and item re-read every time: making a new gradient object (THPVariable_Wrap)
    // may run the garbage collector, and a finaliser could change the list or a
    // parameter's .grad. Nothing sane does; nothing here reads freed memory if it does
    // (gradient_object holds what it reads then). Python code runs nowhere else in the
    // walk but in a Py_DECREF that frees a parameter a finaliser took out of the list,
    // when only owned references are held; TORCH_WARN (a non-leaf's .grad) is buffered
    // until host_pass has built its result.
    for (Py_ssize_t i = first; i < PySequence_Fast_GET_SIZE(items); ++i) {
      read_ahead(PySequence_Fast_ITEMS(items), PySequence_Fast_GET_SIZE(items), i, take_grad);
      PyObject* object = PySequence_Fast_GET_ITEM(items, i);
      // Exactly Tensor or Parameter: any other subclass may override attribute reads.
      if (!THPVariable_CheckExact(object)) return Outcome::kNotDescribed;
      PyObject* tensor = object;
      if (take_grad) {
        tensor = gradient_object(object);
        if (tensor == nullptr) {
          if (PyErr_Occurred()) return Outcome::kPythonError;
          continue;  // no gradient
        }
        walk.tensors.push_back(tensor);
        walk.kept.push_back(i);
        if (!THPVariable_CheckExact(tensor)) return Outcome::kNotDescribed;
      } else {
        Py_INCREF(object);
        walk.tensors.push_back(object);
      }
      const at::Tensor& t = THPVariable_Unpack(tensor);
      // dtypes are a 64-bit mask; torch has ~45 today.
      if (!describable(t.layout()) || static_cast<int>(t.scalar_type()) >= 64) {
        return Outcome::kNotDescribed;
      }
      describe<kListing>(walk, tensor, t);
      if (kListing && !walk.listing) return walk_items<false>(walk, items, take_grad, i + 1);
    }
  } catch (const c10::Error&) {
    return Outcome::kNotDescribed;
  }
  return Outcome::kDescribed;
}

// Whether `words` are the bytes of `key` (a bytes object, or nullptr).
bool same_bytes(const std::vector<uint64_t>& words, PyObject* key) {
  const auto size = static_cast<Py_ssize_t>(words.size() * sizeof(uint64_t));
  return key != nullptr && PyBytes_GET_SIZE(key) == size &&
         std::memcmp(PyBytes_AS_STRING(key), words.data(), static_cast<size_t>(size)) == 0;
}

// The key of a finished walk, a new reference. When its records are the bytes of the key
// returned last time (`remembered`, nullptr for none; the usual case: a training loop's
// gradients keep their memory), that bytes object: Python then finds its plan key by
// identity (dispatch.native_plan_key), with no new 108 KB object at 4,500 gradients, no
// comparison of two, and no search for an address listed twice: the same addresses as last
// time, where none was listed twice (that key has no trailer: a key with one decodes to the
// same records plus kTrailerMark, which no header word can equal, so its bytes differ from
// records alone). Otherwise a new object, with its trailer, remembered in its place.
PyObject* walk_key(Walk& walk, PyObject** remembered) {
  if (remembered != nullptr && same_bytes(walk.words, *remembered)) {
    return Py_NewRef(*remembered);
  }
  add_shared_addresses(walk);
  PyObject* key = PyBytes_FromStringAndSize(
      reinterpret_cast<const char*>(walk.words.data()),
      static_cast<Py_ssize_t>(walk.words.size() * sizeof(uint64_t)));
  if (key != nullptr && remembered != nullptr) Py_XSETREF(*remembered, Py_NewRef(key));
  return key;
}

// The result tuple of host_pass from a finished walk; its tensors' references move into it.
// `remembered_key`: see walk_key.
PyObject* walk_result(Walk& walk, Py_ssize_t n, bool take_grad, PyObject** remembered_key) {
  PyObject* key = walk_key(walk, remembered_key);  // first: it may add the trailer's hash
  if (key == nullptr) {
    walk.release_tensors();
    return nullptr;
  }
  PyObject* tensor_list = PyList_New(static_cast<Py_ssize_t>(walk.tensors.size()));
  if (tensor_list == nullptr) {
    Py_DECREF(key);
    walk.release_tensors();
    return nullptr;
  }
  for (size_t j = 0; j < walk.tensors.size(); ++j) {
    PyList_SET_ITEM(tensor_list, static_cast<Py_ssize_t>(j), walk.tensors[j]);  // steals
  }
  PyObject* listing = Py_NewRef(Py_None);
  if (walk.listing && !walk.tensors.empty()) {
    Py_DECREF(listing);
    listing = wrap_listing(new CpuListing{Py_NewRef(tensor_list), walk.tensors,
                                          std::move(walk.listed), std::move(walk.held),
                                          std::move(walk.buffers)});
  }
  walk.drop_listing();
  walk.tensors.clear();
  PyObject* kept_list = nullptr;
  if (take_grad && static_cast<Py_ssize_t>(walk.kept.size()) != n) {
    kept_list = PyList_New(static_cast<Py_ssize_t>(walk.kept.size()));
    for (size_t j = 0; kept_list != nullptr && j < walk.kept.size(); ++j) {
      PyObject* position = PyLong_FromSsize_t(walk.kept[j]);
      if (position == nullptr) {  // no list with an empty slot: the result fails whole
        Py_CLEAR(kept_list);
        break;
      }
      PyList_SET_ITEM(kept_list, static_cast<Py_ssize_t>(j), position);
    }
  } else {
    kept_list = Py_NewRef(Py_None);
  }
  PyObject* device = PyList_GET_SIZE(tensor_list) == 0 ? Py_NewRef(Py_None)
                                                       : THPDevice_New(walk.first_device);
  PyObject* dtypes = dtype_set(walk.dtypes);
  PyObject* flags = PyLong_FromLong(walk.flags);
  const uint64_t key_hash =
      mix(walk.hash, walk.hash2 ^ static_cast<uint64_t>(PyList_GET_SIZE(tensor_list)));
  PyObject* hash = PyLong_FromLongLong(static_cast<long long>(key_hash));
  PyObject* parts[] = {tensor_list, kept_list, device, dtypes, flags, hash, key, listing};
  constexpr Py_ssize_t kParts = sizeof(parts) / sizeof(parts[0]);
  PyObject* result = nullptr;
  bool complete = true;
  for (PyObject* part : parts) complete = complete && part != nullptr;
  if (complete) result = PyTuple_New(kParts);
  if (result == nullptr) {
    for (PyObject* part : parts) Py_XDECREF(part);
    return nullptr;
  }
  for (Py_ssize_t j = 0; j < kParts; ++j) PyTuple_SET_ITEM(result, j, parts[j]);  // steals
  return result;
}

// host_pass(items, take_grad, list_for_cpu_pass=False) -> None, or
//   (tensors, kept, device, dtypes, flags, key_hash, key_bytes, cpu_listing)
// items: a list or tuple of tensors (take_grad False) or of parameters (take_grad True).
// tensors: the items, or their non-None .grad in order; kept: None when every item gave a
// tensor, else the positions in items of those that did. device: the first tensor's (None
// when there is none). dtypes: frozenset of torch.dtype. flags: kSingleDevice | ...
// cpu_listing: with list_for_cpu_pass, when every tensor is one the CPU statistics pass
// reads, a capsule listing them for it (csrc/cpu_listing.h); else None.
// None: the walk could not describe the items; the caller takes the Python path.
PyObject* host_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 && nargs != 3) {
    PyErr_SetString(PyExc_TypeError,
                    "host_pass(items, take_grad, list_for_cpu_pass=False) takes 2 or 3 arguments");
    return nullptr;
  }
  PyObject* items = args[0];
  const int take_grad = PyObject_IsTrue(args[1]);
  if (take_grad < 0) return nullptr;
  const int list_for_cpu_pass = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
  if (list_for_cpu_pass < 0) return nullptr;
  if (!PyList_Check(items) && !PyTuple_Check(items)) Py_RETURN_NONE;
  // A torch function mode may intercept .grad and every attribute read: Python's business.
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;

  // The result is owned here, outside HANDLE_TH_ERRORS: its warning handler emits the
  // walk's TORCH_WARNs as Python warnings when its scope ends, after the result is built,
  // and raises if a filter turns one into an error; the result is then dropped with the
  // gradient references it holds, instead of leaking.
  struct OwnedResult {
    PyObject* object = nullptr;
    ~OwnedResult() { Py_XDECREF(object); }
  } result;
  HANDLE_TH_ERRORS
  static Walk shared;
  static PyObject* shared_key = nullptr;  // the shared walk's last key (kept for good)
  Walk own;
  Walk& walk = shared.busy ? own : shared;
  walk.reset();
  walk.listing = list_for_cpu_pass != 0;
  if (walk.listing) {
    walk.listed.reserve(static_cast<size_t>(PySequence_Fast_GET_SIZE(items)));
    walk.held.reserve(static_cast<size_t>(PySequence_Fast_GET_SIZE(items)));
    walk.buffers.reserve(static_cast<size_t>(PySequence_Fast_GET_SIZE(items)));
  }
  struct Busy {  // however the walk ends (an exception included): free again, holding
    Walk& walk;  // no tensor or storage that the result did not take
    explicit Busy(Walk& w) : walk(w) { walk.busy = true; }
    ~Busy() {
      walk.release_tensors();
      walk.drop_listing();
      walk.busy = false;
    }
  } busy(walk);
  Py_INCREF(items);
  const Outcome outcome = walk.listing ? walk_items<true>(walk, items, take_grad != 0)
                                       : walk_items<false>(walk, items, take_grad != 0);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  Py_DECREF(items);
  if (outcome != Outcome::kDescribed) {
    walk.release_tensors();
    if (outcome == Outcome::kNotDescribed) Py_RETURN_NONE;
    return nullptr;
  }
  result.object = walk_result(walk, n, take_grad != 0, &walk == &shared ? &shared_key : nullptr);
  if (result.object == nullptr) return nullptr;
  END_HANDLE_TH_ERRORS
  return std::exchange(result.object, nullptr);
}

// first_non_tensor(items) -> the index of the first item that is not a torch.Tensor
// (subclasses count as tensors), or -1. The type check of named_items, without a Python
// call per item: lists hold one or two distinct types, so the last one seen is remembered.
PyObject* first_non_tensor(PyObject* /*module*/, PyObject* items) {
  if (!PyList_Check(items) && !PyTuple_Check(items)) {
    PyErr_SetString(PyExc_TypeError, "first_non_tensor expects a list or tuple");
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  PyObject** item = PySequence_Fast_ITEMS(items);
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  PyTypeObject* known = nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyTypeObject* type = Py_TYPE(item[i]);
    if (type == known) continue;
    if (!PyType_IsSubtype(type, tensor_type)) return PyLong_FromSsize_t(i);
    known = type;
  }
  return PyLong_FromLong(-1);
}

PyMethodDef methods[] = {
    {"host_pass", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(host_pass)),
     METH_FASTCALL,
     "host_pass(items, take_grad, list_for_cpu_pass=False): tensors or gradients, routing "
     "facts, plan key and CPU pass listing"},
    {"first_non_tensor", first_non_tensor, METH_O,
     "first_non_tensor(items): index of the first non-tensor item, or -1"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// The method table of gradstats._C (its module is created in cpu_stats.cpp).
PyMethodDef* host_path_methods() {
  return methods;
}

}  // namespace gradstats
