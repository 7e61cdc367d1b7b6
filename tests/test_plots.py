from uae_dist.train.plots import plot_run


def test_plot_run_from_csvs(tmp_path):
    (tmp_path / "train.csv").write_text("step,epoch,loss,loss_a,loss_b,lr\n10,0,1.0,0.5,1.5,1e-3\n20,0,0.5,0.2,0.8,1e-3\n")
    (tmp_path / "val.csv").write_text("step,epoch,mae_a,mae_b,mean_predictor_mae_a,mean_predictor_mae_b\n"
                                      "20,1,0.3,0.6,1.0,1.2\n")
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5000
