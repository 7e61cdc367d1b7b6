"""The shipped split of issue 9's MP protocol (uae_dist/splits/mp_cgcnn6000.json) is the one
scripts/mp_protocol.py computes, and ``--split-file`` takes it by name."""
import importlib.util
import json
import pathlib

import pytest

from uae_dist.data import given_split
from uae_dist.data.options import OptionError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _protocol():
    spec = importlib.util.spec_from_file_location("mp_protocol", ROOT / "scripts" / "mp_protocol.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_split_equals_the_protocol(mp_path):
    shipped = json.loads(given_split.resolve("mp_cgcnn6000").read_text())
    fresh = _protocol().protocol_split(mp_path)
    for part in given_split.PARTS:
        assert shipped[part] == fresh[part], part
    assert [len(shipped[p]) for p in given_split.PARTS] == [4800, 600, 600]
    assert shipped["source_sha256"] == fresh["source_sha256"]


def test_a_split_is_given_by_name_or_path(tmp_path):
    assert "mp_cgcnn6000" in given_split.shipped()
    assert given_split.resolve("mp_cgcnn6000") == given_split.SHIPPED / "mp_cgcnn6000.json"
    f = tmp_path / "mp_cgcnn6000"  # an existing path wins over the shipped name
    f.write_text("{}")
    assert given_split.resolve(str(f)) == f.resolve()
    with pytest.raises(OptionError, match="not a shipped split .*mp_cgcnn6000"):
        given_split.resolve("no_such_split")
