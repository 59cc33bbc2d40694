// starcoder.data._helpers: index builders and the batch gather of the data path.
//
// The Python reference for every function is starcoder/data/helpers.py; results are identical
// (tests compare them). No torch headers: arrays come and go as NumPy arrays through pybind11.
//
//   permutation     uniform random permutation by Rao-Sandelius: scatter each element to one of
//                   K ~ n / 2^16 buckets drawn from a counter-based hash (input order kept inside a
//                   bucket), then Fisher-Yates each cache-sized bucket with its own generator.
//   document_index  documents [first, last) x epochs, shuffled (int32), optional separate last epoch,
//                   with their sizes in that order
//   shuffle_index   permutation of [0, first) then of [first, total) (uint32, int64 when large)
//   sample_index    megatron-core's build_sample_idx (windows of seq_length + 1 tokens)
//   blending_index  megatron-core's greedy build_blending_indices
//   gather          copy samples from the memory-mapped .bin into one [B, seq_length + 1] int64 array

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kBucketSalt = 0xD1B54A32D192ED03ULL;
constexpr int kBucketBits = 16;

inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

inline uint64_t mulhi(uint64_t a, uint64_t b) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
}

int64_t num_buckets(int64_t n) { return std::max<int64_t>(1, (n + (int64_t(1) << kBucketBits) - 1) >> kBucketBits); }

// Run fn(t, begin, end) on up to `threads` threads over [0, n) split into contiguous ranges of
// at least `grain` items (the split depends only on n, threads and grain).
template <typename F>
void parallel_ranges(int64_t n, int threads, F fn, int64_t grain = 4096) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / grain + 1)));
  if (threads == 1) {
    fn(0, int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    int64_t begin = n * t / threads, end = n * (t + 1) / threads;
    pool.emplace_back(fn, t, begin, end);
  }
  for (auto &th : pool) th.join();
}

// out[j] = value(pi(j)) for a uniform random permutation pi of [0, n) keyed by `key`; when `carried`
// is given, carried[j] = carry(pi(j)) too, moved along in the same passes. (The sample index reads
// document sizes in shuffled order: carried here, they are read sequentially instead of at random.)
template <typename T, typename V, typename C>
void permute_into(T *out, int32_t *carried, int64_t n, uint64_t key, int threads, V value, C carry) {
  if (n == 0) return;
  const int64_t k = num_buckets(n);
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / 4096 + 1)));
  // Pass 1: per-thread bucket counts over contiguous index ranges.
  std::vector<std::vector<int64_t>> counts(nt, std::vector<int64_t>(k, 0));
  parallel_ranges(n, nt, [&](int t, int64_t begin, int64_t end) {
    auto &c = counts[t];
    for (int64_t i = begin; i < end; ++i) ++c[mulhi(mix64(key + uint64_t(i + 1) * kGolden), k)];
  });
  // Where each thread writes inside each bucket: stable, so identical for any thread count.
  std::vector<int64_t> bucket_start(k + 1, 0);
  std::vector<std::vector<int64_t>> cursor(nt, std::vector<int64_t>(k, 0));
  int64_t pos = 0;
  for (int64_t b = 0; b < k; ++b) {
    bucket_start[b] = pos;
    for (int t = 0; t < nt; ++t) {
      cursor[t][b] = pos;
      pos += counts[t][b];
    }
  }
  bucket_start[k] = pos;
  // Pass 2: scatter.
  parallel_ranges(n, nt, [&](int t, int64_t begin, int64_t end) {
    auto &cur = cursor[t];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j = cur[mulhi(mix64(key + uint64_t(i + 1) * kGolden), k)]++;
      out[j] = value(i);
      if (carried) carried[j] = carry(i);
    }
  });
  // Pass 3: Fisher-Yates inside each bucket, buckets spread over threads.
  parallel_ranges(k, nt, [&](int, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T *a = out + bucket_start[b];
      int32_t *c = carried ? carried + bucket_start[b] : nullptr;
      const int64_t m = bucket_start[b + 1] - bucket_start[b];
      uint64_t state = mix64(key ^ (uint64_t(b + 1) * kBucketSalt));
      for (int64_t j = m - 1; j > 0; --j) {
        state += kGolden;
        const int64_t i = static_cast<int64_t>(mulhi(mix64(state), uint64_t(j + 1)));
        std::swap(a[j], a[i]);
        if (c) std::swap(c[j], c[i]);
      }
    }
  }, 1);
}

template <typename T, typename V>
void permute_into(T *out, int64_t n, uint64_t key, int threads, V value) {
  permute_into(out, nullptr, n, key, threads, value, [](int64_t) { return int32_t(0); });
}

template <typename T>
py::array_t<T> new_array(int64_t n) { return py::array_t<T>(std::vector<py::ssize_t>{static_cast<py::ssize_t>(n)}); }

py::array_t<int64_t> permutation(int64_t n, uint64_t key, int threads) {
  auto out = new_array<int64_t>(n);
  int64_t *p = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    permute_into(p, n, key, threads, [](int64_t i) { return i; });
  }
  return out;
}

template <typename T>
const T *checked(const py::array &a, const char *name);

// Documents [first, last) x epochs, shuffled, and their sizes in that order.
py::tuple document_index(int64_t first, int64_t last, int64_t epochs, bool separate_last, uint64_t key,
                         uint64_t key_last, const py::array &sizes_a, int threads) {
  const int64_t n = last - first;
  if (n <= 0 || epochs <= 0) throw std::invalid_argument("document_index: empty document range");
  if (last > INT32_MAX) throw std::invalid_argument("document_index: document ids exceed int32");
  const int32_t *sizes = checked<int32_t>(sizes_a, "sizes");
  if (sizes_a.size() < last) throw std::invalid_argument("document_index: sizes shorter than the range");
  const int64_t together = (separate_last && epochs > 1) ? epochs - 1 : epochs;
  auto out = new_array<int32_t>(epochs * n);
  auto out_sizes = new_array<int32_t>(epochs * n);
  int32_t *p = out.mutable_data(), *ps = out_sizes.mutable_data();
  {
    py::gil_scoped_release nogil;
    permute_into(p, ps, together * n, key, threads, [=](int64_t i) { return int32_t(first + i % n); },
                 [=](int64_t i) { return sizes[first + i % n]; });
    if (together < epochs)
      permute_into(p + together * n, ps + together * n, n, key_last, threads,
                   [=](int64_t i) { return int32_t(first + i); }, [=](int64_t i) { return sizes[first + i]; });
  }
  return py::make_tuple(out, out_sizes);
}

py::array shuffle_index(int64_t first, int64_t total, uint64_t key, uint64_t key_last, int threads) {
  auto fill = [&](auto *p) {
    using T = std::remove_pointer_t<decltype(p)>;
    py::gil_scoped_release nogil;
    permute_into(p, first, key, threads, [](int64_t i) { return T(i); });
    permute_into(p + first, total - first, key_last, threads, [=](int64_t i) { return T(first + i); });
  };
  if (total < int64_t(UINT32_MAX) - 1) {
    auto out = new_array<uint32_t>(total);
    fill(out.mutable_data());
    return out;
  }
  auto out = new_array<int64_t>(total);
  fill(out.mutable_data());
  return out;
}

// megatron-core's build_sample_idx, reading doc_sizes[k] = sizes[doc_idx[k]] sequentially.
template <typename T>
void fill_sample_index(T *out, const int32_t *doc_sizes, int64_t n_doc_idx, int32_t seq_length,
                       int64_t num_samples) {
  int64_t position = 0, offset = 0;
  out[0] = 0;
  out[1] = 0;
  for (int64_t k = 1; k <= num_samples; ++k) {
    int64_t remaining = int64_t(seq_length) + 1;
    while (remaining != 0) {
      const int64_t length = doc_sizes[position] - offset;
      remaining -= length;
      if (remaining <= 0) {
        offset += remaining + length - 1;
        remaining = 0;
      } else {
        if (position == n_doc_idx - 1) {
          offset = doc_sizes[position] - 1;
          break;
        }
        ++position;
        offset = 0;
      }
    }
    out[2 * k] = T(position);
    out[2 * k + 1] = T(offset);
  }
}

template <typename T>
const T *checked(const py::array &a, const char *name) {
  if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": expected a C-contiguous " +
                                py::str(py::dtype::of<T>()).cast<std::string>() + " array, got " +
                                py::str(a.dtype()).cast<std::string>());
  return static_cast<const T *>(a.data());
}

py::array sample_index(const py::array &doc_sizes_a, int32_t seq_length, int64_t num_samples, bool wide) {
  const int32_t *doc_sizes = checked<int32_t>(doc_sizes_a, "doc_sizes");
  const int64_t n = doc_sizes_a.size();
  if (seq_length < 1 || n == 0) throw std::invalid_argument("sample_index: empty input");
  auto make = [&](auto tag) -> py::array {
    using T = decltype(tag);
    py::array_t<T> out(std::vector<py::ssize_t>{static_cast<py::ssize_t>(num_samples + 1), 2});
    T *p = out.mutable_data();
    py::gil_scoped_release nogil;
    fill_sample_index(p, doc_sizes, n, seq_length, num_samples);
    return out;
  };
  return wide ? make(int64_t()) : make(int32_t());
}

py::tuple blending_index(const py::array &weights_a, int64_t size) {
  const double *w = checked<double>(weights_a, "weights");
  const int64_t d = weights_a.size();
  if (d < 1 || d > INT16_MAX) throw std::invalid_argument("blending_index: 1 to 32767 sources");
  auto which = new_array<int16_t>(size);
  auto within = new_array<int64_t>(size);
  int16_t *pw = which.mutable_data();
  int64_t *pn = within.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::vector<int64_t> counts(d, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double scale = std::max(double(i), 1.0);
      int64_t best = 0;
      double best_err = w[0] * scale - double(counts[0]);
      for (int64_t s = 1; s < d; ++s) {
        const double err = w[s] * scale - double(counts[s]);
        if (err > best_err) {
          best_err = err;
          best = s;
        }
      }
      pw[i] = int16_t(best);
      pn[i] = counts[best]++;
    }
  }
  return py::make_tuple(which, within);
}

template <typename Tok, typename Idx>
void gather_rows(int64_t *out, int64_t width, const int64_t *rows, const int64_t *samples, int64_t count,
                 const Tok *tokens, int64_t n_tokens, const int64_t *pointers, const int32_t *sizes,
                 int64_t n_docs, const int32_t *doc_idx, int64_t n_doc_idx, const Idx *sample_idx,
                 int64_t n_samples, int threads, std::string &error) {
  std::vector<std::string> errors(std::max(1, threads));
  parallel_ranges(count, threads, [&](int t, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t s = samples[j];
      if (s < 0 || s >= n_samples) {
        errors[t] = "sample " + std::to_string(s) + " out of range";
        return;
      }
      const int64_t p0 = sample_idx[2 * s], o0 = sample_idx[2 * s + 1];
      const int64_t p1 = sample_idx[2 * s + 2], o1 = sample_idx[2 * s + 3];
      int64_t *dst = out + rows[j] * width;
      int64_t filled = 0;
      for (int64_t p = p0; p <= p1; ++p) {
        if (p >= n_doc_idx) break;
        const int64_t doc = doc_idx[p];
        if (doc < 0 || doc >= n_docs) {
          errors[t] = "document " + std::to_string(doc) + " out of range";
          return;
        }
        const int64_t begin_tok = (p == p0) ? o0 : 0;
        const int64_t end_tok = (p == p1) ? o1 + 1 : sizes[doc];
        const int64_t start = pointers[doc] / int64_t(sizeof(Tok)) + begin_tok;
        const int64_t len = end_tok - begin_tok;
        if (len < 0 || filled + len > width || start + len > n_tokens) {
          errors[t] = "sample " + std::to_string(s) + " does not fit its window";
          return;
        }
        const Tok *src = tokens + start;
        for (int64_t i = 0; i < len; ++i) dst[filled + i] = int64_t(src[i]);
        filled += len;
      }
      if (filled != width) {
        errors[t] = "sample " + std::to_string(s) + " has " + std::to_string(filled) + " tokens, expected " +
                    std::to_string(width);
        return;
      }
    }
  }, 1);
  for (auto &e : errors)
    if (!e.empty()) error = e;
}

void gather(py::array out_a, const py::array &rows_a, const py::array &samples_a, const py::array &tokens_a,
            const py::array &pointers_a, const py::array &sizes_a, const py::array &doc_idx_a,
            const py::array &sample_idx_a, int threads) {
  if (!py::isinstance<py::array_t<int64_t>>(out_a) || out_a.ndim() != 2 || !(out_a.flags() & py::array::c_style) ||
      !out_a.writeable())
    throw std::invalid_argument("out: expected a writable C-contiguous int64 [B, width] array");
  int64_t *out = static_cast<int64_t *>(out_a.mutable_data());
  const int64_t width = out_a.shape(1);
  const int64_t *rows = checked<int64_t>(rows_a, "rows");
  const int64_t *samples = checked<int64_t>(samples_a, "samples");
  const int64_t count = rows_a.size();
  if (samples_a.size() != count) throw std::invalid_argument("rows and samples differ in length");
  for (int64_t j = 0; j < count; ++j)
    if (rows[j] < 0 || rows[j] >= out_a.shape(0)) throw std::invalid_argument("row out of range");
  const int64_t *pointers = checked<int64_t>(pointers_a, "pointers");
  const int32_t *sizes = checked<int32_t>(sizes_a, "sizes");
  const int32_t *doc_idx = checked<int32_t>(doc_idx_a, "doc_idx");
  if (sample_idx_a.ndim() != 2 || sample_idx_a.shape(1) != 2) throw std::invalid_argument("sample_idx: expected [S+1, 2]");
  const int64_t n_samples = sample_idx_a.shape(0) - 1;
  std::string error;
  auto run = [&](auto tok_tag, auto idx_tag) {
    using Tok = decltype(tok_tag);
    using Idx = decltype(idx_tag);
    const Tok *tokens = checked<Tok>(tokens_a, "tokens");
    const Idx *sample_idx = checked<Idx>(sample_idx_a, "sample_idx");
    py::gil_scoped_release nogil;
    gather_rows(out, width, rows, samples, count, tokens, int64_t(tokens_a.size()), pointers, sizes,
                int64_t(sizes_a.size()), doc_idx, int64_t(doc_idx_a.size()), sample_idx, n_samples, threads, error);
  };
  const bool wide = py::isinstance<py::array_t<int64_t>>(sample_idx_a);
  if (py::isinstance<py::array_t<uint16_t>>(tokens_a)) {
    wide ? run(uint16_t(), int64_t()) : run(uint16_t(), int32_t());
  } else if (py::isinstance<py::array_t<int32_t>>(tokens_a)) {
    wide ? run(int32_t(), int64_t()) : run(int32_t(), int32_t());
  } else {
    throw std::invalid_argument("tokens: expected uint16 or int32");
  }
  if (!error.empty()) throw std::runtime_error("gather: " + error);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "starcoder data path: index builders and batch gather (see starcoder/data/helpers.py)";
  m.def("permutation", &permutation, py::arg("n"), py::arg("key"), py::arg("threads") = 1);
  m.def("document_index", &document_index, py::arg("first"), py::arg("last"), py::arg("epochs"),
        py::arg("separate_last"), py::arg("key"), py::arg("key_last"), py::arg("sizes"), py::arg("threads") = 1);
  m.def("shuffle_index", &shuffle_index, py::arg("first"), py::arg("total"), py::arg("key"), py::arg("key_last"),
        py::arg("threads") = 1);
  m.def("sample_index", &sample_index, py::arg("doc_sizes"), py::arg("seq_length"), py::arg("num_samples"),
        py::arg("wide"));
  m.def("blending_index", &blending_index, py::arg("weights"), py::arg("size"));
  m.def("gather", &gather, py::arg("out"), py::arg("rows"), py::arg("samples"), py::arg("tokens"),
        py::arg("pointers"), py::arg("sizes"), py::arg("doc_idx"), py::arg("sample_idx"), py::arg("threads") = 1);
}
