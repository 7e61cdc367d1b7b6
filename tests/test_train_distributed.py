"""Real 2-rank DeepSpeed runs on CPU (gloo) under the deepspeed, torchrun and mpirun launchers."""
import json

import pytest
import torch

from _train_fixtures import latest_meta, launch, rows, tiny_lmdb
from uae_dist.train import checkpoint as ckpt
from uae_dist.train.distributed import expand_nodelist, resolve_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lmdb(tmp_path_factory)


def _replicas_equal(out):
    meta = latest_meta(out)
    assert meta["world_size"] == 2
    digests = meta["param_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    return meta


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.timeout(240)
def test_deepspeed_launcher_zero1_loss_falls(data, tmp_path):
    out = tmp_path / "run"
    launch("deepspeed", data, out, ["ds.config=zero1", "train.epochs=6", "optim.lr=0.002",
                                    "model.dropout=0.0"])
    meta = _replicas_equal(out)
    assert meta["launcher"] == "deepspeed" and meta["ds_config"]["zero_optimization"]["stage"] == 1
    assert meta["ds_config"]["train_batch_size"] == 2
    r = rows(out)
    first = [float(x["loss"]) for x in r if x["epoch"] == "0"]
    last = [float(x["loss"]) for x in r if x["epoch"] == "5"]
    assert _mean(last) < 0.8 * _mean(first), (_mean(first), _mean(last))
    # rank 0's CPU clocks (benchmarks/pretrain_throughput.py's steady-state kernel share)
    user, kern = ([float(x[k]) for x in r] for k in ("cpu_user_s", "cpu_sys_s"))
    assert user == sorted(user) and kern == sorted(kern) and user[-1] > user[0] > 0
    val = rows(out, "val.csv")
    assert len(val) == 6 and int(val[-1]["n_val"]) == meta["n_val"]  # each val item counted once
    # every file of a checkpoint loads with weights_only=True
    d = ckpt.latest(out / "checkpoints")
    for f in d.glob("*.pt"):
        torch.load(f, weights_only=True)


@pytest.mark.timeout(180)
def test_torchrun_zero2_loss_falls(data, tmp_path):
    out = tmp_path / "run"
    launch("torchrun", data, out, ["ds.zero_stage=2", "train.epochs=6", "optim.lr=0.002", "model.dropout=0.0"])
    meta = _replicas_equal(out)
    assert meta["launcher"] == "torchrun" and meta["ds_config"]["zero_optimization"]["stage"] == 2
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    r = rows(out)
    first = [float(x["loss"]) for x in r if x["epoch"] == "0"]
    last = [float(x["loss"]) for x in r if x["epoch"] == "5"]
    assert _mean(last) < 0.8 * _mean(first), (_mean(first), _mean(last))


@pytest.mark.timeout(180)
def test_mpirun_zero1(data, tmp_path):
    out = tmp_path / "run"
    launch("mpirun", data, out, ["train.epochs=1"])
    meta = _replicas_equal(out)
    assert meta["launcher"] == "mpi"


def test_resolve_env_launchers():
    i = resolve_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                     "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (i.rank, i.world_size, i.local_rank, i.local_world_size, i.master_addr, i.master_port, i.launcher) == \
        (3, 8, 1, 4, "n1", 1234, "torchrun")
    s = resolve_env({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                     "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "1001",
                     "PATH": "/nonexistent"})
    assert (s.rank, s.world_size, s.local_rank, s.local_world_size, s.launcher) == (5, 8, 1, 4, "slurm")
    assert s.master_addr == "gpu07" and s.master_port == 29500 + 1001
    # the batch shell of an sbatch job (no srun step) is a single process, not rank 0 of N
    assert resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).world_size == 1
    m = resolve_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                     "MASTER_ADDR": "h", "MASTER_PORT": "99"})
    assert (m.rank, m.world_size, m.local_rank, m.launcher, m.master_addr) == (1, 2, 1, "mpi", "h")
    assert resolve_env({}).launcher == "single"
    assert expand_nodelist("a[01-03,07],b5,c[9]") == ["a01", "a02", "a03", "a07", "b5", "c9"]


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_single_gpu_bf16(cuda_kernels, data, tmp_path):
    """On a GPU machine: nccl backend, bf16 (ds.precision=auto), fp32 consolidated weights in
    model.safetensors."""
    out = tmp_path / "run"
    launch("torchrun", data, out, ["train.epochs=1", "train.threads=null"], nproc=1, gpu=True)
    meta = latest_meta(out)
    assert meta["ds_config"]["bf16"]["enabled"] is True
    m = ckpt.read_model(ckpt.latest(out / "checkpoints"))
    assert all(v.dtype == torch.float32 for v in m["weights"].values() if v.is_floating_point())


@pytest.mark.timeout(180)
def test_srun_environment_two_tasks(data, tmp_path):
    """The Slurm branch of distributed.py with the environment srun gives each task (no Slurm daemons
    here): 2 real processes, SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID, master from the node list."""
    import subprocess

    from _train_fixtures import ROOT, command, env, free_port

    out = tmp_path / "run"
    port = free_port()
    procs = []
    for r in (0, 1):
        e = env()
        e.update(SLURM_JOB_ID="4242", SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2",
                 SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="localhost",
                 MASTER_PORT=str(port), PATH=f"/nonexistent-scontrol:{e['PATH']}")
        procs.append(subprocess.Popen(command("python", data, out, ["train.epochs=1"]), cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=170)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    meta = _replicas_equal(out)
    assert meta["launcher"] == "slurm"


def test_pick_device_uses_the_visible_gpu():
    """Issue 7.6: with one GPU bound per task (srun --gpus-per-task=1, --gpu-bind) a rank sees one
    device, index 0, whatever its local rank; with the node's GPUs visible, its local rank."""
    from uae_dist.train.distributed import LaunchError, pick_device

    assert pick_device(3, 4, 1) == 0
    assert pick_device(3, 4, 4) == 3
    with pytest.raises(LaunchError, match="one task per GPU"):
        pick_device(2, 4, 2)
    with pytest.raises(LaunchError, match="no CUDA device"):
        pick_device(0, 1, 0)


def test_mpirun_across_nodes_without_mpi4py_fails_clearly(monkeypatch):
    """Issue 7.6: ranks on several nodes must not each meet at their own 127.0.0.1."""
    import sys

    from uae_dist.train.distributed import LaunchError

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py → ImportError
    two_nodes = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                 "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        resolve_env(two_nodes)
    one_node = dict(two_nodes, OMPI_COMM_WORLD_LOCAL_SIZE="4")
    assert resolve_env(one_node).master_addr == "127.0.0.1"
    given = dict(two_nodes, MASTER_ADDR="node1", MASTER_PORT="29400")
    assert resolve_env(given).master_addr == "node1"


@pytest.mark.timeout(180)
def test_startup_compiles_no_deepspeed_op(tmp_path):
    """Issue 14 (start-up): DeepSpeed's CPU backend would JIT-compile its inference-only shm
    all-reduce at every fresh init (tens of seconds; a killed build leaves a lock that hangs every
    later start). Our init skips it: nothing is built into TORCH_EXTENSIONS_DIR."""
    import subprocess
    import sys

    from _train_fixtures import ROOT, env

    code = ("from uae_dist.train.distributed import setup_distributed; setup_distributed(); "
            "from deepspeed.comm import comm as c; print('shm op:', c.cdb.shm_comm_op)")
    e = dict(env(), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "shm op: None" in p.stdout
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))
