"""Graph ops used by the data builder and every model (neighbour lists, geometry, scatter)."""
from .geometry import edge_vectors
from .neighbors_ref import neighbor_list_numpy
from .scatter import scatter, segment_softmax

__all__ = ["edge_vectors", "neighbor_list_numpy", "scatter", "segment_softmax"]
