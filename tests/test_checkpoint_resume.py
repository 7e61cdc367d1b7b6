"""Kill-and-resume and SIGTERM-and-resume reproduce an uninterrupted 2-rank run exactly (CPU)."""
import json
import signal
import time

import psutil
import pytest
import torch

from _train_fixtures import latest_meta, launch, losses, popen, rows, tiny_lmdb
from uae_dist.train import checkpoint as ckpt

# dropout on, so the restored RNG states matter; checkpoints every 4 steps besides epoch ends
OVR = ["train.epochs=3", "train.ckpt_every_steps=4", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lmdb(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    launch("torchrun", data, out, OVR)
    return out


def _final_weights(out):
    return ckpt.read_model(ckpt.latest(out / "checkpoints"))["weights"]


def _same_as_reference(out, ref):
    assert losses(out) == losses(ref)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(rows(out, "val.csv")) == strip(rows(ref, "val.csv"))
    a, b = _final_weights(out), _final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(240)
def test_kill_and_resume_equals_uninterrupted(data, reference, tmp_path):
    out = tmp_path / "run"
    p = launch("torchrun", data, out, OVR + ["train.fail_after_steps=10"], check=False)
    assert p.returncode != 0  # both ranks hard-exit at step 10, no checkpoint of their own
    assert latest_meta(out)["step"] == 8
    launch("torchrun", data, out, OVR)  # train.resume=auto
    _same_as_reference(out, reference)


@pytest.mark.timeout(240)
def test_sigterm_checkpoints_and_resumes(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = popen("torchrun", data, out, OVR + ["train.ckpt_every_steps=null"])
    try:
        deadline = time.time() + 120
        while not ((out / "train.csv").exists() and len(rows(out)) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.05)
        # like a pre-emption that reaches one task first: signal only one rank; the ranks agree
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "launch/train.py" in " ".join(c.cmdline())]
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    meta = latest_meta(out)
    assert meta["status"] == "preempted" and 3 <= meta["step"]
    assert json.loads((out / "summary.json").read_text())["status"] == "preempted"
    n_done = len(losses(reference))
    assert meta["step"] < n_done, "run finished before the signal arrived"
    launch("torchrun", data, out, OVR + ["train.ckpt_every_steps=null"])
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    _same_as_reference(out, reference)


@pytest.mark.timeout(120)
def test_nonfinite_loss_stops_with_step_and_ids(data, tmp_path):
    p = launch("python", data, tmp_path / "run", ["optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0"],
               check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "non-finite loss at step" in p.stderr and "records ['mp-" in p.stderr, p.stderr[-2000:]


def test_latest_falls_back_to_newest_complete(tmp_path):
    for name in ("step_00000004", "step_00000008", "step_00000012.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"")
        (tmp_path / name / "state.json").write_text("{}")
    (tmp_path / "latest").write_text("step_00000016")  # killed between swap and rename
    assert ckpt.latest(tmp_path).name == "step_00000008"
    (tmp_path / "latest").write_text("step_00000004")
    assert ckpt.latest(tmp_path).name == "step_00000004"
    assert ckpt.resolve(tmp_path).name == "step_00000004"


@pytest.mark.timeout(240)
def test_resume_on_other_data_is_refused(data, tmp_path_factory, tmp_path):
    """A checkpoint's sampler position and normaliser belong to its data build: no silent resume."""
    out = tmp_path / "run"
    launch("python", data, out, ["train.max_steps=2", "export.after_train=false"], nproc=1)
    other = tiny_lmdb(tmp_path_factory, n=100)
    p = launch("python", other, out, ["train.max_steps=4", "export.after_train=false"], nproc=1, check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "another build of the data" in p.stderr
