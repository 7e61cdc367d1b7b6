"""uae-dist: periodic crystal graphs, CrystalTransformer pretraining and universal atomic embeddings."""
from ._version import __version__


def load_uae(path):
    """Load an exported UAE directory (see ``uae-dist export``)."""
    from .export import load_uae as _load

    return _load(path)


__all__ = ["__version__", "load_uae"]
