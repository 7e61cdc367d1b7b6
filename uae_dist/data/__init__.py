"""Crystal data: readers, graph records, sharded LMDB, dataset and batch sampler.

Torch-based names load lazily so that the data CLI (build/verify/info) starts without importing torch.
"""
_LAZY = {
    "CrystalGraphDataset": "dataset", "collate": "dataset", "load_manifest": "dataset",
    "GraphLoader": "loader", "DistributedAtomBatchSampler": "sampler", "build_lmdb": "build", "open_source": "sources",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
