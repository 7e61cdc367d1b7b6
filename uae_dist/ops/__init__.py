"""Graph ops used by the data builder and every model (neighbour lists, geometry, scatter).

The compiled extension (``uae_dist._C``, C++/OpenMP and CUDA) is used when it was built; otherwise the
ops fall back to pure PyTorch/NumPy and log a warning once. ``UAE_DISABLE_EXT=1`` forces the fallback;
:func:`backend` / ``HAS_EXT`` tell which is in use.
"""
from ._ext import HAS_EXT, backend
from .geometry import edge_vectors
from .neighbors import neighbor_list, neighbor_list_np
from .neighbors_ref import neighbor_list_numpy
from .scatter import scatter, scatter_torch, segment_softmax, segment_softmax_torch

__all__ = ["HAS_EXT", "backend", "edge_vectors", "neighbor_list", "neighbor_list_np", "neighbor_list_numpy",
           "scatter", "scatter_torch", "segment_softmax", "segment_softmax_torch"]
