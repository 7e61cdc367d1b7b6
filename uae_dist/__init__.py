"""uae-dist: periodic crystal graphs, CrystalTransformer pretraining and universal atomic embeddings."""
from ._version import __version__


def load_uae(path, warn: bool = True):
    """An exported UAE directory (see ``uae-dist export``) or a shipped table by name
    (``load_uae("mp-v1")``), as a ``uae_dist.tables.Table``."""
    from .export import load_uae as _load

    return _load(path, warn=warn)


__all__ = ["__version__", "load_uae"]
