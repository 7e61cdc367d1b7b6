"""An element table (a UAE export or any ``load_table`` spec) driving the peer implementations.

Each recipe is tested against the installed peer package (``tests/test_interop.py``).

**CGCNN** (txie-93/cgcnn). Its ``AtomCustomJSONInitializer`` reads ``<root>/atom_init.json`` as
it is: a JSON object ``{"Z": [f0, f1, …]}`` with string keys of atomic numbers and equal-length
lists; ``len(row)`` becomes ``orig_atom_fea_len``. ``uae-dist export`` writes that file;
``write_atom_init(table, root / "atom_init.json")`` writes it for any table. Elements absent from
the file fail there with an ``AssertionError`` (``atom_type in self.atom_types``).

**ALIGNN** (``alignn``, features through ``jarvis.core.specie``)::

    width = use_table_in_alignn("uae:runs/pretrain/uae", elements=["O", "Ti", …])
    config["atom_features"] = "cgcnn"; config["model"]["atom_input_features"] = width

``use_table_in_alignn`` writes the table as ``atom_init.json``, sets
``jarvis.core.specie.cgcnn_feature_json`` to it and calls
``get_node_attributes.cache_clear()``, so every graph built afterwards in this process (DGL or
``alignn.torch_graph_builder``) carries the table's rows. jarvis silently substitutes row
``"100"`` for an element the file lacks: pass the data's ``elements`` to have that refused here.

**MEGNet** (``matgl``)::

    model = matgl.models.MEGNet(dim_node_embedding=table.dim, …)
    load_into_megnet(model, "uae:runs/pretrain/uae", trainable=True)

copies the rows, in the model's ``element_types`` order (not by Z), into
``model.embedding.layer_node_embedding`` and freezes it unless ``trainable``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from uae_dist.elements import N_ELEMENTS, SYMBOLS, z_of


def _table(spec):
    from uae_dist.tables import Table, load_table

    return spec if isinstance(spec, Table) else load_table(spec)


def _require(t, elements) -> None:
    if elements is None:
        return
    zs = [e if isinstance(e, (int, np.integer)) else z_of(str(e)) for e in elements]
    t.require([z for z in zs if z is not None], trained=True)


def atom_init_dict(spec, only_trained: bool = True) -> dict[str, list[float]]:
    """CGCNN's ``atom_init.json`` content: ``{"Z": [floats]}`` for every row the table defines
    (``only_trained``: and, for a UAE, every row its pretraining saw)."""
    t = _table(spec)
    ok = t.trained if only_trained else t.present
    return {str(k + 1): [float(v) for v in t.values[k]] for k in range(N_ELEMENTS) if ok[k]}


def write_atom_init(spec, path, only_trained: bool = True, elements=None) -> Path:
    """Write CGCNN's ``atom_init.json`` for ``spec`` (a Table or a ``load_table`` spec);
    ``elements`` (symbols or Z) must all have rows, else ValueError naming them."""
    t = _table(spec)
    _require(t, elements)
    path = Path(path)
    path.write_text(json.dumps(atom_init_dict(t, only_trained)))
    return path


def use_table_in_alignn(spec, path=None, elements=None) -> int:
    """Make jarvis/alignn's ``atom_features="cgcnn"`` read ``spec``; returns the width to set
    as ``atom_input_features``. ``path``: where to write the file (default: a temporary file
    kept for the life of the process)."""
    import jarvis.core.specie as specie

    if path is None:
        path = Path(tempfile.mkdtemp(prefix="uae_alignn_")) / "atom_init.json"
    t = _table(spec)
    write_atom_init(t, path, elements=elements)
    specie.cgcnn_feature_json = str(path)
    specie.get_node_attributes.cache_clear()
    return t.dim


def reset_alignn_table() -> None:
    """Back to the CGCNN table that jarvis ships."""
    import jarvis.core.specie as specie

    specie.cgcnn_feature_json = str(Path(specie.__file__).with_name("atom_init.json"))
    specie.get_node_attributes.cache_clear()


def load_into_megnet(model, spec, trainable: bool = True) -> list[str]:
    """Copy the table's rows into a matgl MEGNet's node embedding, row k = ``element_types[k]``;
    ``trainable=False`` freezes it. Returns the element types the table has no row for (they keep
    their initial rows: harmless only if the data never holds them)."""
    import torch

    t = _table(spec)
    emb = model.embedding.layer_node_embedding
    if emb.embedding_dim != t.dim:
        raise ValueError(f"the model's node embedding is {emb.embedding_dim}-d and the table "
                         f"{t.name!r} {t.dim}-d: build MEGNet(dim_node_embedding={t.dim}, …)")
    kept = []
    with torch.no_grad():
        for k, sym in enumerate(model.element_types):
            z = SYMBOLS.index(sym) + 1 if sym in SYMBOLS else None
            if z is None or not t.present[z - 1]:
                kept.append(sym)
                continue
            emb.weight[k] = torch.as_tensor(t.values[z - 1], dtype=emb.weight.dtype)
    emb.weight.requires_grad_(trainable)
    return kept


__all__ = ["atom_init_dict", "write_atom_init", "use_table_in_alignn", "reset_alignn_table",
           "load_into_megnet"]
