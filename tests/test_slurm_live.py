"""Live Slurm: real slurmctld, slurmd and munged on this machine, real ``sbatch slurm/*.sh``, real DeepSpeed ranks.

The fixtures (tests/_slurm_cluster.py) install Debian's Slurm packages when they are missing and start a
cluster of their own: one node on localhost with 2 CPUs, and for the two-node test two hosts made of network
namespaces joined by a veth pair, each with its own slurmd. They need root. Without it (a developer laptop)
these tests skip, except under ``UAE_REQUIRE_SLURM=1`` (set by .ci/run), where a cluster that cannot start
fails them instead. Every wait is bounded: a job that overruns is cancelled and the test fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import _slurm_cluster as S
from _train_fixtures import ROOT, SMOKE, losses, rows, tiny_lmdb
from uae_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.slurm

# the tiny run every test here starts from: 3 epochs of 95 structures (about 24 optimizer steps), dropout on (so a
# resume must restore the RNG streams), the UAE exported at the end
OVR = ["train.epochs=3", "export.after_train=true"]
# s: bounds against a hang, not performance targets. A run takes 30-60 s on a quiet 2-core machine; a busy one
# (other test suites, a first JIT build of DeepSpeed's CPU comm op) has taken several minutes.
JOB_TIMEOUT = 600
SBATCH_CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]  # --time: Slurm's own bound, minutes


def _unavailable(reason: str):
    if os.environ.get("UAE_REQUIRE_SLURM") == "1":
        pytest.fail(f"UAE_REQUIRE_SLURM=1 but no test cluster: {reason}")
    pytest.skip(reason)


def _cluster(make, tmp_path_factory, name):
    if os.geteuid() != 0:
        _unavailable("the test cluster needs root (it runs slurmctld/slurmd as root and may apt-get install)")
    try:
        S.ensure_installed()
        c = make(tmp_path_factory.mktemp(name)).start()
    except S.SlurmUnavailable as e:
        _unavailable(str(e))
    c.jobs = []
    yield c
    c.stop()
    for j in c.jobs:  # node-local staging of a job that was cancelled half-way (pretrain.sh removes its own)
        for d in Path("/tmp").glob(f"uae-*-{j}"):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from _cluster(S.one_node, tmp_path_factory, "slurm1")


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    yield from _cluster(S.two_nodes, tmp_path_factory, "slurm2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lmdb(tmp_path_factory)


class Job:
    def __init__(self, cluster: S.Cluster, job_id: str, work: Path, run_dir: Path):
        self.cluster, self.id, self.work, self.run_dir = cluster, job_id, work, run_dir

    @property
    def log(self) -> str:
        p = self.work / f"slurm-{self.id}.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait(self, timeout: float = JOB_TIMEOUT) -> dict:
        try:
            return self.cluster.wait_job(self.id, timeout)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n--- job log\n{self.log[-6000:]}") from None

    def wait_rows(self, n: int, timeout: float = JOB_TIMEOUT) -> None:
        """Until the run has logged ``n`` optimizer steps (train.csv rows)."""
        deadline = time.time() + timeout
        while not ((self.run_dir / "train.csv").exists() and len(rows(self.run_dir)) >= n):
            info = self.cluster.job(self.id)
            assert info.get("JobState") not in S.FINAL, f"job ended first: {info}\n{self.log[-4000:]}"
            assert time.time() < deadline, f"no {n} steps after {timeout}s\n{self.log[-4000:]}"
            time.sleep(0.2)


def submit(cluster: S.Cluster, work: Path, data: Path, sbatch_args=(), overrides=OVR, script="slurm/pretrain.sh",
           **env) -> Job:
    """sbatch the real script from the repository root, as a user would, with this test's settings."""
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    e = dict(cluster.env, UAE_CONFIG=str(SMOKE), UAE_DATA=str(data), UAE_RUN_DIR=str(run_dir),
             UAE_PYTHON=sys.executable, UAE_VENV=str(Path(sys.executable).parents[1]), PYTHONPATH=str(ROOT),
             PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    e.update(env)
    j = cluster.sbatch([*SBATCH_CPU, f"--output={work}/slurm-%j.out", *sbatch_args, script, *overrides], env=e,
                       cwd=ROOT)
    cluster.jobs.append(j)
    return Job(cluster, j, work, run_dir)


def final_weights(run_dir: Path) -> dict:
    return ckpt.read_model(ckpt.latest(run_dir / "checkpoints"))["weights"]


def assert_same_run(run: Path, ref: Path) -> None:
    """Same loss rows, same validation rows and bit-identical final weights as the reference run."""
    assert losses(run) == losses(ref)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(rows(run, "val.csv")) == strip(rows(ref, "val.csv"))
    a, b = final_weights(run), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- one node
@pytest.fixture(scope="module")
def completed(slurm, data, tmp_path_factory):
    """The uninterrupted reference: `sbatch slurm/pretrain.sh`, 2 tasks on one node, data staged to /tmp."""
    t0 = time.time()
    job = submit(slurm, tmp_path_factory.mktemp("completed"), data, ["--nodes=1", "--ntasks-per-node=2"])
    job.info = job.wait()
    job.seconds = time.time() - t0
    return job


@pytest.mark.timeout(JOB_TIMEOUT + 300)  # its setup also installs Slurm if needed and starts the cluster
def test_pretrain_completes_with_checkpoint_and_export(completed):
    info, log, run = completed.info, completed.log, completed.run_dir
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    assert info["Restarts"] == "0"
    assert "nodes: uae1; 2 task(s)" in log and "master 127.0.0.1:" in log  # NodeAddr: 'uae1' does not resolve
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    state = json.loads((ckpt.latest(run / "checkpoints") / "state.json").read_text())
    meta = state["meta"]
    assert meta["status"] == "finished" and meta["launcher"] == "slurm" and meta["world_size"] == 2
    n = state["step"]
    assert n >= 20 and [s for s, _ in losses(run)] == list(range(1, n + 1))
    assert len(set(meta["param_sha256_per_rank"])) == 1  # both ranks ended with the same weights
    # the export: the best checkpoint's element table, as written by the run itself
    from uae_dist.export import embedding_from_checkpoint, load_uae

    uae = load_uae(run / "uae", warn=False)
    table, _ = embedding_from_checkpoint(run / "checkpoints" / "best")
    assert uae.embedding.shape == (100, 16) and (uae.embedding[uae.seen] == table[uae.seen]).all()
    # staged to node-local /tmp (no SLURM_TMPDIR here) and removed again at the end
    staged = Path(f"/tmp/uae-root-{completed.id}")
    assert f"-> {staged}/" in log and not staged.exists()


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_pretrain_writes_test_metrics(completed):
    assert completed.info["JobState"] == "COMPLETED"
    m = json.loads((completed.run_dir / "test_metrics.json").read_text())["targets"]
    for t in ("e_form_per_atom", "band_gap"):
        assert {"mae", "rmse", "r2"} <= set(m[t]) and m[t]["count"] > 0, m
    assert (completed.run_dir / "predictions_test.csv").exists()


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_term_checkpoints_requeues_and_resumes_to_the_same_result(slurm, data, completed, tmp_path):
    """TERM to the batch shell (what --signal=B:TERM@120 does before the time limit): the step checkpoints, the
    script requeues the job, the restart resumes from the checkpoint and ends bit-identical to `completed`."""
    job = submit(slurm, tmp_path, data, ["--nodes=1", "--ntasks-per-node=2"])
    job.wait_rows(3)
    slurm.run(["scancel", "--batch", "--signal=TERM", job.id])
    info = job.wait(2 * JOB_TIMEOUT)
    log = job.log
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    assert info["Restarts"] == "1", log[-6000:]
    # the first run stopped on the signal and wrote a checkpoint; the same job (same log, appended) resumed it
    first, _, second = log.partition(f"job {job.id} restart 1]")
    assert "signal received" in first and f"requeueing job {job.id}" in first, log[-6000:]
    stop = int(re.search(r"signal received: checkpoint step (\d+) written", first).group(1))
    assert 3 <= stop < len(losses(completed.run_dir)), "the signal arrived too late to interrupt the run"
    assert f"resuming from {job.run_dir}/checkpoints/step_{stop:08d}" in second
    assert f"resumed from {job.run_dir}/checkpoints/step_{stop:08d}: step {stop}," in second
    assert json.loads((job.run_dir / "summary.json").read_text())["status"] == "finished"
    assert_same_run(job.run_dir, completed.run_dir)


def _kill_rank(job_id: str, rank: int) -> int:
    """SIGKILL the training process of one rank of a job (found by its Slurm environment)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "launch/train.py" not in " ".join(p.info["cmdline"] or []):
                continue
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank):
            p.send_signal(signal.SIGKILL)
            return p.pid
    raise AssertionError(f"no rank {rank} of job {job_id} found")


@pytest.mark.parametrize("case", ["bad_config", "missing_data", "rank_dies"])
@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_failing_job_ends_failed_with_the_reason_in_its_log(slurm, data, tmp_path, case):
    env, ovr = {}, OVR
    if case == "bad_config":
        ovr = OVR + ["train.no_such_key=1"]
    if case == "missing_data":
        env["UAE_DATA"] = str(tmp_path / "not_built")
    job = submit(slurm, tmp_path, data, ["--nodes=1", "--ntasks-per-node=2"], ovr, **env)
    if case == "rank_dies":
        job.wait_rows(2)
        _kill_rank(job.id, 1)
        t_kill = time.time()
    info = job.wait()
    log = job.log
    assert info["JobState"] == "FAILED", f"{info}\n{log[-4000:]}"
    assert info["Restarts"] == "0"  # a failure is not a pre-emption: never requeued
    reason = log.strip().splitlines()[-1]
    assert "FAILED:" in reason, log[-4000:]
    if case == "bad_config":
        assert info["ExitCode"] == "2:0" and "unknown config key 'train.no_such_key'" in log
        assert "bad config or missing data" in reason
    elif case == "missing_data":
        assert info["ExitCode"] == "2:0" and f"data set '{tmp_path}/not_built' not found" in reason
    else:
        # rank 0 is blocked in a collective with the dead rank: srun --kill-on-bad-exit ends it at once
        assert time.time() - t_kill < 60, "the surviving rank was left hanging"
        assert "task 1: Killed" in log and "a task was killed by a signal" in reason
        assert info["ExitCode"] != "0:0"
        assert not (job.run_dir / "summary.json").exists()


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_finetune_array_runs_one_cell_per_task(slurm, tmp_path):
    """`sbatch --array=0-1 slurm/finetune.sh MATRIX`: every array task runs its own cell of a real matrix, with
    its own log; both complete and `uae-dist results` reads them."""
    from _matrix_fixtures import smoke_dict, write_matrix

    d = smoke_dict()  # the shipped smoke matrix, one seed: 2 cells (two featurizers)
    d["seeds"] = [0]
    d["out_root"] = str(tmp_path / "runs")
    d["datasets"]["mp_tiny"]["root"] = str(tmp_path / "data")  # built by whichever cell comes first
    d["backbones"]["ct"]["budget"] = {"train.epochs": 1, "train.max_steps": 6}
    matrix = write_matrix(tmp_path / "matrix.yaml", d)
    results = tmp_path / "runs"
    e = dict(slurm.env, UAE_VENV=str(Path(sys.executable).parents[1]), UAE_PYTHON=sys.executable,
             PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    job = slurm.sbatch([*SBATCH_CPU, "--array=0-1", "--ntasks-per-node=1", f"--output={tmp_path}/slurm-%A_%a.out",
                        "slurm/finetune.sh", matrix], env=e, cwd=ROOT)
    slurm.jobs.append(job)
    infos = [slurm.wait_job(f"{job}_{k}", JOB_TIMEOUT) for k in (0, 1)]
    for k, info in enumerate(infos):
        log = (tmp_path / f"slurm-{job}_{k}.out").read_text()
        assert info["ArrayJobId"] == job and info["ArrayTaskId"] == str(k), info
        assert f"array {job} task {k}: cell {k} of {matrix}" in log, log
        assert info["JobState"] in S.FINAL and info["Restarts"] == "0"
    assert [i["JobState"] for i in infos] == ["COMPLETED", "COMPLETED"]
    p = subprocess.run([str(Path(sys.executable).parent / "uae-dist"), "results", str(results), "--strict"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for k in (0, 1):
        assert json.loads(next(results.rglob("metrics.json")).read_text())  # each cell left its metrics
    assert len(list(results.rglob("metrics.json"))) == 2


# ---------------------------------------------------------------------------------------------- two nodes
@pytest.mark.timeout(JOB_TIMEOUT + 120)
def test_two_node_job_meets_over_the_veth_link(slurm2, data, completed, tmp_path):
    """`sbatch --nodes=2 slurm/pretrain.sh` on hosts n1 and n2 (one slurmd each, in their own network namespaces):
    one rank per node, rendezvous at n1's veth address, data staged to each node's own local directory; the run
    equals the one-node 2-task run step for step."""
    n1, n2 = slurm2.nodes
    before = slurm2.veth_bytes(n2)
    job = submit(slurm2, tmp_path, data, ["--nodes=2", "--ntasks-per-node=1"], SLURM_TMPDIR=str(slurm2.node_local))
    info = job.wait()
    log = job.log
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    assert "nodes: n1 n2; 2 task(s)" in log and f"master {n1.addr}:" in log
    # each node staged its own copy into its own local directory (which the other node cannot see)
    for n in (n1, n2):
        assert (n.local_dir / data.name / "manifest.json").read_bytes() == (data / "manifest.json").read_bytes()
    assert not any(slurm2.node_local.iterdir())
    # the gradients crossed the link: in every optimizer step n2 receives at least half of the gradient
    # (reduce-scatter over 2 ranks), so at least steps x params x 2 bytes came through n2's veth end
    n_params = sum(v.numel() for v in final_weights(job.run_dir).values())
    assert slurm2.veth_bytes(n2) - before > len(losses(completed.run_dir)) * n_params * 2
    assert_same_run(job.run_dir, completed.run_dir)
