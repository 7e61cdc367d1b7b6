"""Issue 8, bad input read from the source: every case is a per-record reject with a reason, and the
other records are kept. Inputs are real MP records, modified; builds are real (LMDB, pymatgen,
processes). Points: 1 (labels, id key), 3 (FIFO, /dev/zero), 6 (wrong chemistry), 9 (CGCNN and
CIF details)."""
import os
import re
import resource

import pytest

from _data_fixtures import cgcnn_folder, cli, manifest, mp_records, reject_rows, rejects, write_json
from uae_dist.data.build import build_lmdb

pytestmark = pytest.mark.timeout(300)


def build(src, out, **kw):
    kw.setdefault("shards", 1)
    return build_lmdb(src, out, progress=False, use_mpi=False, **kw)


# ------------------------------------------------------------------ 8.1 silent loss of a target
def test_string_label_is_a_reject_and_never_drops_the_column(tmp_path):
    recs = mp_records(20)
    recs[2]["e_form_per_atom"] = "abc"
    src = write_json(tmp_path / "s.json.gz", recs)
    m = build(src, tmp_path / "auto")  # default targets: from the whole source
    assert m["targets"]["names"] == ["e_form_per_atom", "band_gap", "efermi", "volume", "magmom"]
    assert rejects(tmp_path / "auto") == {recs[2]["material_id"]: "non_numeric_label"}
    assert m["counts"]["records"] == 19
    m = build(src, tmp_path / "explicit", targets="e_form_per_atom,band_gap")
    (row,) = reject_rows(tmp_path / "explicit")
    assert row["reason"] == "non_numeric_label" and "'abc'" in row["detail"]
    assert recs[2]["material_id"] not in m["records"]["ids"]


def test_target_set_does_not_depend_on_one_record(tmp_path):
    recs = mp_records(30)
    base = build(write_json(tmp_path / "a.json.gz", recs), tmp_path / "a")["targets"]["names"]
    for k in (0, 17):  # a string early (within any sniffed prefix) or late changes nothing
        bad = [dict(r) for r in recs]
        bad[k]["band_gap"] = "n/a"
        m = build(write_json(tmp_path / f"b{k}.json.gz", bad), tmp_path / f"b{k}")
        assert m["targets"]["names"] == base
        assert rejects(tmp_path / f"b{k}") == {recs[k]["material_id"]: "non_numeric_label"}


def test_id_key_is_chosen_from_every_record(tmp_path):
    recs = mp_records(12)
    del recs[0]["material_id"]  # the first record alone lacks it
    m = build(write_json(tmp_path / "s.json.gz", recs), tmp_path / "o")
    assert m["records"]["ids"] == [r["material_id"] for r in recs[1:]]
    assert m["source"]["id_key"] == "material_id"
    assert rejects(tmp_path / "o") == {0: "missing_id"}


# ------------------------------------------------------------------ 8.3 only bounded regular files
@pytest.mark.timeout(120)
def test_fifo_named_cif_is_rejected_not_waited_for(tmp_path):
    recs = mp_records(5)
    d = cgcnn_folder(tmp_path / "cg", recs)
    with open(d / "id_prop.csv", "a") as f:
        f.write("fifo,0.5\n")
    os.mkfifo(d / "fifo.cif")  # no writer: reading it blocks forever
    r = cli("data", "build", "--source", d, "--out", tmp_path / "o", "--shards", 1, "-q",
            timeout=60)
    assert r.returncode == 0, r.stderr
    assert rejects(tmp_path / "o") == {"fifo": "unreadable_file"}
    assert manifest(tmp_path / "o")["counts"]["records"] == 5


def _limit_memory():  # a regression reads /dev/zero into memory: fail it fast, not the machine
    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


@pytest.mark.timeout(120)
def test_symlink_to_dev_zero_is_rejected_not_read(tmp_path):
    recs = mp_records(5)
    d = cgcnn_folder(tmp_path / "cg", recs)
    with open(d / "id_prop.csv", "a") as f:
        f.write("zero,0.5\n")
    os.symlink("/dev/zero", d / "zero.cif")
    r = cli("data", "build", "--source", d, "--out", tmp_path / "o", "--shards", 1, "-q",
            timeout=60, preexec_fn=_limit_memory)
    assert r.returncode == 0, r.stderr
    (row,) = reject_rows(tmp_path / "o")
    assert (row["id"], row["reason"]) == ("zero", "unreadable_file")
    assert "not a regular file" in row["detail"]


# ------------------------------------------------------------------ 8.6 wrong chemistry
def _site_lines(cif: str) -> list[str]:
    return cif.split("_atom_site_occupancy\n", 1)[1].strip().splitlines()


def _with_site(cif: str, k: int, symbol: str | None = None, occupancy: str | None = None) -> str:
    """The CIF with site ``k``'s type symbol and label, or its occupancy, replaced."""
    lines = _site_lines(cif)
    cols = lines[k].split()
    if symbol is not None:
        cols[0], cols[1] = symbol, symbol + "0"
    if occupancy is not None:
        cols[-1] = occupancy
    return cif.replace(lines[k], "  " + "  ".join(cols))


@pytest.mark.parametrize("fast", [True, False], ids=["fast_cif", "pymatgen"])
def test_wrong_chemistry_is_rejected(tmp_path, fast):
    recs = mp_records(40)
    binary = [r for r in recs if len({ln.split()[0] for ln in _site_lines(r["cif"])}) >= 2][:3]
    binary[0]["cif"] = _with_site(binary[0]["cif"], 0, symbol="Uuo")  # pymatgen: U
    binary[1]["cif"] = _with_site(binary[1]["cif"], -1, occupancy="0")  # pymatgen drops the site
    binary[2]["cif"] = _with_site(binary[2]["cif"], -1, occupancy="-1")
    src = write_json(tmp_path / "s.json.gz", recs)
    m = build(src, tmp_path / "o", fast_cif=fast, targets="e_form_per_atom")
    rows = {r["id"]: r for r in reject_rows(tmp_path / "o")}
    assert {b["material_id"] for b in binary} <= set(rows)
    for b in binary:
        assert rows[b["material_id"]]["reason"] == "changed_chemistry"
    assert "Uuo" in rows[binary[0]["material_id"]]["detail"]
    assert "occupancy 0" in rows[binary[1]["material_id"]]["detail"]
    assert m["counts"]["records"] == 40 - len(rows)


# ------------------------------------------------------------------ 8.9 smaller ones (input side)
def test_bom_in_id_prop_keeps_the_first_record(tmp_path):
    recs = mp_records(6)
    d = cgcnn_folder(tmp_path / "cg", recs, bom=True)
    assert (d / "id_prop.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    m = build(d, tmp_path / "o")
    assert m["records"]["ids"] == [r["material_id"] for r in recs]


def test_one_row_with_an_extra_column_is_a_reject(tmp_path):
    recs = mp_records(8)
    d = cgcnn_folder(tmp_path / "cg", recs)
    rows = (d / "id_prop.csv").read_text().splitlines()
    rows[3] += ",7.7"
    (d / "id_prop.csv").write_text("\n".join(rows) + "\n")
    m = build(d, tmp_path / "o")
    assert m["targets"]["names"] == ["target0"]  # no all-NaN second target
    assert rejects(tmp_path / "o") == {recs[3]["material_id"]: "malformed_row"}
    assert m["counts"]["records"] == 7


def test_path_like_ids_never_read_outside_the_folder(tmp_path):
    recs = mp_records(6)
    d = cgcnn_folder(tmp_path / "data" / "cg", recs)
    (tmp_path / "data" / "outside.cif").write_text(recs[0]["cif"])  # a valid CIF, outside
    (tmp_path / "abs.cif").write_text(recs[1]["cif"])
    with open(d / "id_prop.csv", "a") as f:
        f.write(f"../outside,0.1\n{tmp_path / 'abs'},0.2\n")
    m = build(d, tmp_path / "o")
    assert rejects(tmp_path / "o") == {"../outside": "unsafe_id",
                                       str(tmp_path / "abs"): "unsafe_id"}
    assert m["counts"]["records"] == 6


@pytest.mark.parametrize("fast", [True, False], ids=["fast_cif", "pymatgen"])
def test_negative_cell_length_is_rejected(tmp_path, fast):
    recs = mp_records(6)
    recs[4]["cif"] = re.sub(r"(_cell_length_b\s+)", r"\1-", recs[4]["cif"])
    m = build(write_json(tmp_path / "s.json.gz", recs), tmp_path / "o", fast_cif=fast)
    (row,) = reject_rows(tmp_path / "o")
    assert (row["id"], row["reason"]) == (recs[4]["material_id"], "bad_cell")
    assert "_cell_length_b" in row["detail"]
    assert m["counts"]["records"] == 5
