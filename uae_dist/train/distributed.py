"""The one place that knows how the job was launched.

``resolve_env`` turns a launcher's environment into (rank, world size, local rank, master address):

1. ``RANK``/``WORLD_SIZE`` (torchrun, ``deepspeed`` launcher, any env:// launcher)
2. Slurm step (``srun``): ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``, master = first host of
   ``SLURM_STEP_NODELIST`` (``scontrol show hostnames``, else parsed here), port from the job id
3. MPI (``mpirun``): ``OMPI_COMM_WORLD_*`` or ``PMI_*`` env; rank 0's host name is broadcast with
   mpi4py; without mpi4py a job on one node uses 127.0.0.1, and a job across nodes must set
   ``MASTER_ADDR``/``MASTER_PORT`` (an error says so, instead of every node meeting itself)
4. nothing: one process on 127.0.0.1 and a free port

``setup_distributed`` exports the result as env:// variables and calls ``deepspeed.init_distributed``
(gloo on CPU, nccl on GPU) on the rank's visible GPU (``pick_device``). A plain
``python launch/train.py`` is a world of one.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"
    backend: str = "gloo"
    device: str = "cpu"
    device_index: int = -1  # the CUDA device this rank drives (DeepSpeed's device_rank), -1 on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,07],gpu5`` → ``[node01, node02, node03, node07, gpu5]`` (Slurm's compressed host list)."""
    hosts, depth, cur = [], 0, ""
    parts = []
    for ch in nodelist:  # split on commas outside brackets
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part.strip())
        if not m:
            hosts.append(part.strip())
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            if "-" in rng:
                lo, hi = rng.split("-", 1)
                for k in range(int(lo), int(hi) + 1):
                    hosts.extend(h + suffix for h in [f"{prefix}{k:0{len(lo)}d}"])
            else:
                hosts.append(f"{prefix}{rng}{suffix}")
    return [h for h in hosts if h]


def slurm_master(nodelist: str) -> str:
    """The first node of the allocation, by the address Slurm reaches it at (its NodeAddr): a node's name
    need not resolve (NodeName ≠ host name, or NodeAddr on another network). The name when scontrol can't say."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=20, check=True).stdout.split()
        if out:
            return _slurm_node_addr(out[0])
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = expand_nodelist(nodelist)
    return hosts[0] if hosts else "127.0.0.1"


def _slurm_node_addr(node: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=20,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else node


def _first_int(text: str | None, default: int) -> int:
    m = re.match(r"\d+", text or "")
    return int(m.group()) if m else default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_env(env=None) -> DistInfo:
    """Launcher environment → DistInfo (pure except for ``scontrol``/mpi4py look-ups of the master host)."""
    env = os.environ if env is None else env
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "CROSS_RANK" in env or "DS_ACCELERATOR_LAUNCH" in env else "env"
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        ws = int(env["WORLD_SIZE"])
        return DistInfo(int(env["RANK"]), ws, int(env.get("LOCAL_RANK", 0)),
                        int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", ws))), env.get("MASTER_ADDR", "127.0.0.1"),
                        port or DEFAULT_PORT, launcher)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # inside an srun step (not the batch shell)
        ws = int(env["SLURM_STEP_NUM_TASKS"])
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        addr = env.get("MASTER_ADDR") or (slurm_master(nodelist) if nodelist else "127.0.0.1")
        if port is None:
            port = DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 2000
        local_ws = _first_int(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE"), ws)
        return DistInfo(int(env["SLURM_PROCID"]), ws, int(env.get("SLURM_LOCALID", 0)), local_ws, addr, port,
                        "slurm")
    for r, s, lr, lws in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                           "OMPI_COMM_WORLD_LOCAL_SIZE"),
                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                          ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE")):
        if r in env and s in env:
            rank, ws = int(env[r]), int(env[s])
            local_ws = int(env.get(lws, ws))
            addr = env.get("MASTER_ADDR")
            if addr is None or port is None:
                addr2, port2 = _mpi_bcast_master(rank, multi_node=local_ws < ws)
                addr, port = addr or addr2, port or port2
            return DistInfo(rank, ws, int(env.get(lr, 0)), local_ws, addr, port, "mpi")
    return DistInfo(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port or free_port(), "single")


class LaunchError(RuntimeError):
    pass


def _mpi_bcast_master(rank: int, multi_node: bool) -> tuple[str, int]:
    try:
        from mpi4py import MPI
    except ImportError:
        if multi_node:
            raise LaunchError("mpirun across nodes needs mpi4py (pip install mpi4py) to find rank "
                              "0's host, or MASTER_ADDR and MASTER_PORT exported to every rank "
                              "(mpirun -x MASTER_ADDR=<rank-0 host> -x MASTER_PORT=29500)") from None
        return "127.0.0.1", DEFAULT_PORT
    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), free_port()) if rank == 0 else None
    host, port = comm.bcast(mine, root=0)
    if host == socket.gethostname():
        host = "127.0.0.1"
    return host, port


def pick_device(local_rank: int, local_world_size: int, visible: int) -> int:
    """The CUDA device index for a rank that sees ``visible`` devices.

    One visible device (Slurm ``--gpus-per-task=1`` or ``--gpu-bind``, or CUDA_VISIBLE_DEVICES set
    per rank) is that rank's device; a node-wide view (all of the node's GPUs visible to every
    rank) gives device ``local_rank``."""
    if visible < 1:
        raise LaunchError("no CUDA device is visible to this rank")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise LaunchError(f"local rank {local_rank} of {local_world_size} sees only {visible} GPUs: "
                      "run one task per GPU (e.g. srun --gpus-per-task=1)")


def setup_distributed(backend: str = "auto", timeout_min: float = 30.0) -> DistInfo:
    """Resolve the launch, export env:// variables, init torch.distributed via DeepSpeed."""
    import datetime

    import torch

    info = resolve_env()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if on_gpu:
        info.device_index = pick_device(info.local_rank, info.local_world_size,
                                        torch.cuda.device_count())
        info.device = f"cuda:{info.device_index}"
    else:
        info.device = "cpu"
    info.backend = ("nccl" if on_gpu else "gloo") if backend == "auto" else backend
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      LOCAL_WORLD_SIZE=str(info.local_world_size), MASTER_ADDR=info.master_addr,
                      MASTER_PORT=str(info.master_port))
    if on_gpu:
        torch.cuda.set_device(torch.device(info.device))
    import deepspeed

    _skip_inference_comm_op()

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False, init_method="env://",
                                   timeout=datetime.timedelta(minutes=timeout_min), rank=info.rank,
                                   world_size=info.world_size)
    return info


def _skip_inference_comm_op() -> None:
    """DeepSpeed's torch backend probes every op builder (compiler subprocesses) and JIT-compiles a
    shared-memory all-reduce (``deepspeed_shm_comm``) at each init: tens of seconds on a fresh
    machine, and a build killed midway leaves a lock file that makes every later start wait
    forever. Only its inference all-reduce uses that op; training never does, so report no
    compatible ops (DeepSpeed reads this dict only to decide whether to build it)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(t, op: str = "sum"):
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        if dist.get_backend() == "nccl" and not t.is_cuda:  # NCCL reduces device tensors only
            import torch

            dev = t.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(dev, op=red)
            t.copy_(dev.cpu())
        else:
            dist.all_reduce(t, op=red)
    return t


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_object(obj) -> list:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
