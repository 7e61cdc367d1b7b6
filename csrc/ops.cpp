// Operator schemas of the uae_dist extension, declared once for every backend.
//
// Device kernels are registered with TORCH_LIBRARY_IMPL in *_cpu.cpp / *_cuda.cu; autograd formulas and
// fake (meta) kernels are registered from Python (uae_dist/ops/_ext.py). Importing uae_dist._C is all
// it takes to make torch.ops.uae_dist.* available. The host-only ops of the CPU caching allocator
// (cpu_cache_*) are declared beside it, in cpu_cache.cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty Python module, so `import uae_dist._C` loads the shared library (and runs the static
// registrations below) without linking libpython-specific pybind11 bindings.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // size of per-interpreter state
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(uae_dist, m) {
  // Periodic neighbour list. pos (N,3); cell (3,3) or (B,3,3); pbc (3,) or (B,3) bool; batch (N,) sorted
  // graph ids (None: one structure). Returns i, j (E,) and shift (E,3) sorted by (i,j,shift): int64,
  // or with compact=True int32 i, j and int8 shift (11 instead of 40 bytes per pair; a shift outside
  // [-128, 127] is a ValueError). method: 0 auto, 1 brute force over images, 2 cell list (CPU only;
  // for tests/benchmarks).
  m.def("neighbor_list(Tensor pos, Tensor cell, Tensor pbc, Tensor? batch, float cutoff, "
        "int? max_neighbors=None, int method=0, bool compact=False) -> (Tensor, Tensor, Tensor)");
  // Reduce rows of src (E, ...) into dim_size rows by index (E,) on src's device: reduce in
  // {sum, mean, max, min}; empty rows give 0. sorted=True promises a non-decreasing index (CSR fast
  // path, no sort on CUDA). A broken promise or an index outside [0, dim_size) is an error: a
  // ValueError / IndexError on CPU, a device-side assertion on CUDA (no host sync).
  m.def("scatter(Tensor src, Tensor index, int dim_size, str reduce, bool sorted=False) -> Tensor");
  // Softmax of src (E, ...) over the rows that share an index value.
  m.def("segment_softmax(Tensor src, Tensor index, int dim_size, bool sorted=False) -> Tensor");
  // Lengths |pos[j] + shift @ cell - pos[i]| (E,) of stored edges, float64: pos (N,3), cell (B,3,3),
  // i, j (E,) atom indices, shift (E,3), nedges (B,) edges per cell (edges grouped by cell). CPU only
  // (the loader's narrowing of stored graphs); the models recompute lengths with autograd instead.
  m.def("edge_lengths(Tensor pos, Tensor cell, Tensor i, Tensor j, Tensor shift, Tensor nedges) "
        "-> Tensor");
}
