"""uae-dist analyze: outputs, left-out rows, reproducible clustering, a reverse prediction that can
tell a real table from noise, agreement statistics, and the documented errors."""
import json

import numpy as np
import pytest

from uae_dist import cli
from uae_dist.analysis import clusters, reverse, similarity
from uae_dist.analysis.frame import frame_of
from uae_dist.analysis.report import Report
from uae_dist.elements import SYMBOLS
from uae_dist.tables import load_table

N_PRESENT = 56  # H..Ba: the small table lacks the rest
UNTRAINED = ("He", "Ne", "Kr", "Tc", "Xe", "Cs")  # in order of Z, as the report lists them
FIGURES = ("maps_umap.png", "maps_pca.png", "clusters_scan.png", "clusters_periodic.png",
           "similarity.png", "reverse_r2.png", "agreement.png")


def _export_like(d, values, untrained):
    """An export-style directory: uae.npz with ``seen`` and a model card listing the unseen."""
    d.mkdir()
    emb = np.full((100, values.shape[1]), np.nan, dtype=np.float32)
    emb[:N_PRESENT] = values[:N_PRESENT]
    seen = np.isfinite(emb).all(1)
    for s in untrained:
        seen[SYMBOLS.index(s)] = False
    emb[:N_PRESENT][~seen[:N_PRESENT]] = emb[seen].mean(0)  # what the export writes there
    np.savez(d / "uae.npz", embedding=emb, seen=seen)
    card = {"format": "uae-dist UAE export", "table_name": "small-test",
            "elements_unseen": list(untrained), "targets": ["e_form_per_atom"]}
    (d / "model_card.json").write_text(json.dumps(card))
    return d


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """cgcnn92's rows for H..Ba, six of them marked untrained, analysed once through the CLI."""
    root = tmp_path_factory.mktemp("analysis")
    table = _export_like(root / "table", load_table("cgcnn92").values, UNTRAINED)
    out = root / "out"
    rc = cli.main(["analyze", str(table), "--out", str(out), "--compare", "random:8:3",
                   "--seeds", "2", "--k-max", "5", "--folds", "3", "--repeats", "1",
                   "--permutations", "49"])
    assert rc == 0
    return table, out, json.loads((out / "summary.json").read_text())


def test_every_output_exists_and_is_non_trivial(small):
    import matplotlib.image as mpimg

    _, out, s = small
    for name in FIGURES:
        img = mpimg.imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 300, name
        assert img[..., :3].std() > 0.05, f"{name} is (nearly) blank"
    n = N_PRESENT - len(UNTRAINED)
    for name, rows in (("clusters.csv", n), ("nearest.csv", n), ("maps.csv", n),
                       ("similarity.csv", n)):
        lines = (out / name).read_text().splitlines()
        assert len(lines) == rows + 1, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "src=\"http" not in page and "<link" not in page and "<script" not in page
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in md
    assert "small-test" in page and "model card" in page.lower()  # the card is shown
    k = s["clusters"]["k"]
    assert 2 <= k <= 5 and np.isfinite(s["clusters"]["silhouette_mean"])
    assert f"the chosen k = <b>{k}</b>" in page and k <= s["clusters"]["k_elbow"]


def test_untrained_and_absent_rows_enter_no_statistic(small):
    _, out, s = small
    analysed = set(s["elements"])
    assert analysed == set(SYMBOLS[:N_PRESENT]) - set(UNTRAINED)
    assert s["untrained"] == list(UNTRAINED) and s["absent"] == list(SYMBOLS[N_PRESENT:])
    assert set(s["nearest"]) == analysed
    assert not {e for nn in s["nearest"].values() for e, _ in nn} - analysed
    assert set(s["clusters"]["labels_seed0"]) == analysed
    assert {SYMBOLS[z - 1] for z in s["reverse_elements"]} <= analysed
    assert all(a["n"] == len(analysed) for a in s["agreement"])
    md = (out / "report.md").read_text()
    assert "left out, untrained" in md and ", ".join(UNTRAINED) in md
    assert f"absent from the table: {100 - N_PRESENT}" in md


def test_untrained_rows_do_not_change_the_frame(tmp_path):
    """Garbage in untrained rows, or no rows at all, leaves exactly the same analysed data."""
    values = load_table("cgcnn92").values
    a = frame_of(load_table(_export_like(tmp_path / "a", values, UNTRAINED)))
    noisy = values.copy()
    for s in UNTRAINED:
        noisy[SYMBOLS.index(s)] = 1e6
    b = frame_of(load_table(_export_like(tmp_path / "b", noisy, UNTRAINED)))
    rows = [f"{SYMBOLS[k]}," + ",".join(map(str, values[k])) for k in range(N_PRESENT)
            if SYMBOLS[k] not in UNTRAINED]
    (tmp_path / "c.csv").write_text("element," + ",".join(map(str, range(92))) + "\n"
                                    + "\n".join(rows) + "\n")
    c = frame_of(load_table(tmp_path / "c.csv"))
    for f in (b, c):
        assert np.array_equal(a.z, f.z) and np.allclose(a.x, f.x)


def test_clustering_is_reproducible_with_a_seed_and_finds_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=8.0, size=(3, 12))
    x = np.concatenate([c + rng.normal(size=(20, 12)) for c in centres])
    a = clusters.scan(x, range(2, 7), seeds=[0, 1])
    b = clusters.scan(x, range(2, 7), seeds=[0, 1])
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.maps, b.maps)
    assert np.array_equal(a.silhouette, b.silhouette)
    assert a.k == a.k_elbow == a.k_silhouette == 3 and a.stability > 0.99
    truth = np.repeat([1, 2, 3], 20)
    assert np.array_equal(a.ordered_labels(0), truth)


def test_elbow_rule():
    assert clusters.elbow([2, 3, 4, 5, 6, 7], [100, 30, 25, 21, 18, 16]) == 3
    assert clusters.elbow([2, 3, 4, 5, 6], [100, 90, 80, 20, 15]) == 5


def test_random_table_scores_clearly_worse_than_cgcnn92():
    frames = [frame_of(load_table("cgcnn92")), frame_of(load_table("random:92:0"))]
    scores = reverse.reverse_predict(frames, models=("ridge", "knn"), folds=5, repeats=1)
    mean = {(t, m): np.mean([s.mean for s in scores if s.table == t and s.model == m])
            for t in ("cgcnn92", "random:92:0") for m in ("ridge", "knn")}
    for m in ("ridge", "knn"):
        assert mean[("cgcnn92", m)] > 0.35, mean
        assert mean[("random:92:0", m)] < 0.1, mean
        assert mean[("cgcnn92", m)] - mean[("random:92:0", m)] > 0.3, mean
    assert all(len(s.r2) == 5 and s.n >= 75 for s in scores)


def test_mantel_agreement():
    x = np.random.default_rng(1).normal(size=(30, 5))
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same = similarity.mantel(d, d ** 2, permutations=99)  # a monotone map keeps every rank
    assert same.rho == pytest.approx(1.0) and same.p == pytest.approx(0.01)
    y = np.random.default_rng(2).normal(size=(30, 5))
    other = similarity.mantel(d, np.linalg.norm(y[:, None] - y[None], axis=-1), 99)
    assert abs(other.rho) < 0.3 and other.p > 0.05
    onehot = frame_of(load_table("onehot")).subset(range(1, 31))  # all pairs equally far apart
    assert np.isnan(similarity.mantel(d, similarity.distances(onehot)).rho)


def test_nearest_is_symmetric_in_ties_and_excludes_self():
    sim = similarity.cosine(np.eye(4))
    nn = similarity.nearest(sim, ["A", "B", "C", "D"], k=2)
    assert nn[0] == ("A", [("B", 0.0), ("C", 0.0)])  # ties broken by order, self left out


def test_unknown_symbol_is_a_clear_error(tmp_path, capsys):
    rows = [f"{s},{i},{i % 3}" for i, s in enumerate(SYMBOLS[:20])] + ["Xx,1,2"]
    (tmp_path / "t.csv").write_text("element,a,b\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert cli.main(["analyze", str(tmp_path / "t.csv"), "--out", str(out)]) == 2
    assert "unknown element symbol 'Xx'" in capsys.readouterr().err
    assert not out.exists()  # nothing is written before every table has loaded


def test_too_few_elements_and_bad_compare_names_fail_before_any_work(tmp_path, capsys):
    rows = [f"{s},{i},{i * i}" for i, s in enumerate(SYMBOLS[:6])]
    (tmp_path / "t.csv").write_text("element,a,b\n" + "\n".join(rows) + "\n")
    assert cli.main(["analyze", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "has 6 trained element rows; the analysis needs at least 10" in capsys.readouterr().err
    assert cli.main(["analyze", "cgcnn92", "--out", str(tmp_path / "o"), "--compare",
                     "no-such-table"]) == 2
    assert "no-such-table" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="unknown reverse-prediction model"):
        reverse.reverse_predict([frame_of(load_table("onehot"))], models=("svm",))


def test_report_escapes_text_and_embeds_images(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(tmp_path / "f.png")
    plt.close(fig)
    r = Report("a <b> title")
    r.text("x < y and `code` and **bold**")
    r.table(["h"], [["1.00 ± 0.10"]])
    r.figure(tmp_path / "f.png", "cap")
    page = r.to_html()
    assert "a &lt;b&gt; title" in page and "x &lt; y" in page
    assert "<code>code</code>" in page and "<b>bold</b>" in page
    assert '<td class="num">1.00 ± 0.10</td>' in page and "data:image/png;base64," in page
    assert "![cap](f.png)" in r.to_markdown(tmp_path)
