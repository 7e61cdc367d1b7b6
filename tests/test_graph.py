import numpy as np
import pytest

from uae_dist.data.graph import (GraphOptions, RejectError, build_graph, check_labels, decode_record, encode_record,
                                 record_metadata, validate_crystal)

FE = dict(numbers=np.array([26, 26]), lattice=np.eye(3) * 2.87, frac=np.array([[0, 0, 0], [.5, .5, .5]]),
          pbc=np.array([True] * 3))


def test_encode_decode_round_trip():
    g = build_graph(**FE, options=GraphOptions(6.0))
    blob = encode_record("mp-13", g, np.array([-0.1, np.nan]))
    assert blob[8:9] == b"{", "a safetensors blob: JSON header after the 8-byte length"
    assert record_metadata(blob) == {"id": "mp-13", "schema": "1"}
    r = decode_record(blob)
    assert r["id"] == "mp-13"
    np.testing.assert_array_equal(r["z"], [26, 26])
    np.testing.assert_array_equal(r["i"], np.repeat([0, 1], g["nbr_count"]))
    np.testing.assert_array_equal(r["j"], g["j"])
    np.testing.assert_array_equal(r["shift"], g["shift"])
    assert r["y"][0] == -0.1 and np.isnan(r["y"][1])
    assert r["pos"].dtype == np.float64 and r["shift"].dtype == np.int64
    # compact storage: neighbour indices and shifts in the narrowest integer type
    import safetensors.numpy as st
    raw = st.load(blob)
    assert raw["j"].dtype == np.uint8 and raw["shift"].dtype == np.int8


def test_max_neighbors_option():
    g = build_graph(**FE, options=GraphOptions(6.0, max_neighbors=8))
    assert g["nbr_count"].tolist() == [8, 8]


@pytest.mark.parametrize("change,reason", [
    (dict(numbers=np.array([0, 26])), "element_out_of_range"),
    (dict(numbers=np.array([26, 101])), "element_out_of_range"),
    (dict(numbers=np.array([], dtype=int), frac=np.zeros((0, 3))), "empty_structure"),
    (dict(lattice=np.array([[2.87, 0, 0], [0, np.inf, 0], [0, 0, 2.87]])), "non_finite_lattice"),
    (dict(frac=np.array([[0, 0, np.nan], [.5, .5, .5]])), "non_finite_coordinates"),
    (dict(lattice=np.array([[3.0, 0, 0], [0, 3.0, 0], [3.0, 3.0, 1e-9]])), "degenerate_lattice"),
])
def test_validation_reasons(change, reason):
    kw = dict(FE) | change
    with pytest.raises(RejectError) as e:
        validate_crystal(**kw)
    assert e.value.reason == reason


def test_graph_reasons():
    with pytest.raises(RejectError) as e:
        build_graph(**(FE | dict(lattice=np.eye(3) * 30)), options=GraphOptions(8.0))
    assert e.value.reason == "no_neighbors"
    with pytest.raises(RejectError) as e:
        build_graph(**(FE | dict(frac=np.array([[0, 0, 0], [0, 0, 0.001]]))), options=GraphOptions(8.0))
    assert e.value.reason == "overlapping_atoms"


def test_label_bounds():
    check_labels({"e_form_per_atom": -4.0, "band_gap": np.nan}, {"e_form_per_atom": (-4.5, 5.0), "band_gap": (0, 30)})
    with pytest.raises(RejectError, match="e_form_per_atom=-13.57"):
        check_labels({"e_form_per_atom": -13.57}, {"e_form_per_atom": (-4.5, 5.0)})
