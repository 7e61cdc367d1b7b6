"""A real Slurm cluster on this machine, for the tests marked ``slurm`` (Debian 12: Slurm 22.05, munge 0.5).

Two shapes:

* ``one_node``: slurmctld + one slurmd on 127.0.0.1 (node ``uae1``, 2 CPUs).
* ``two_nodes``: hosts ``n1`` and ``n2``, each a network namespace with its own address on one veth pair, its
  own UTS (host name) and mount namespace (its own /etc/hosts and node-local directory), and its own slurmd;
  slurmctld runs on ``n1``. Clients (sbatch, squeue, ...) run in ``n1``'s network namespace.

Everything is private to the cluster's base directory: its own munged (socket + key), ``slurm.conf``
(``SLURM_CONF``), state, spool, logs and ports, so nothing in /etc is touched and a second cluster (another
checkout's CI, say) does not collide with it. Daemons are stopped by PID after the jobs are cancelled; the
namespaces are deleted after every process inside them has exited.

Run by hand (root) to try the scripts on a local cluster:
    python tests/_slurm_cluster.py up [--two-nodes] DIR      # prints `export SLURM_CONF=...`; Ctrl-C stops it
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "munged", "munge"]
# Slurm job states after which a job never runs again (REQUEUED/PENDING/... are not final)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, no apt, no namespaces): the reason is the message."""


def _sh(args, timeout=60, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}: {p.stderr.strip()}")
    return p


def ensure_installed(timeout: float = 600) -> None:
    """apt-get install the Slurm and munge packages when a binary is missing (root only)."""
    # the daemons, munged and ip live in /usr/sbin, which a non-login environment may leave off PATH
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join(path + [d for d in ("/usr/sbin", "/sbin") if d not in path])
    missing = [b for b in BINARIES if not shutil.which(b)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries {missing} missing and not root, so they cannot be installed")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"Slurm binaries {missing} missing and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # wait for a dpkg lock another apt-get holds instead of failing at once
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=180", "install", "-y", "--no-install-recommends", *PACKAGES]
    # without systemd the packages' postinst cannot start the services (it only warns), which is what we want
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=180", "update"], capture_output=True, text=True,
                       timeout=timeout, env=env)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    if Path("/run/systemd/system").is_dir():  # a host with systemd may have started the packaged units
        subprocess.run(["systemctl", "stop", "slurmctld", "slurmd"], capture_output=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    addr: str
    netns: str | None = None  # None: the machine's own network namespace (localhost)
    local_dir: Path | None = None  # this node's private directory, seen inside it at Cluster.node_local


@dataclass
class Cluster:
    base: Path
    nodes: list[Node]
    cpus: int = 2
    ctld_port: int = 6817
    slurmd_port: int = 6818
    procs: dict = field(default_factory=dict)  # name -> Popen of a daemon (run in the foreground, so pid = daemon)
    veth: tuple[str, str] | None = None

    # ------------------------------------------------------------------ paths and environment
    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.base / "munge" / "munge.socket"

    @property
    def node_local(self) -> Path:
        """The node-local directory as every node sees it (its own Node.local_dir mounted here)."""
        return self.base / "node-local"

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    @property
    def env(self) -> dict:
        """Environment for clients and jobs: this cluster's config, nothing else of the caller's Slurm."""
        e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        e["SLURM_CONF"] = str(self.conf)
        return e

    def client(self, args: list[str]) -> list[str]:
        """A client command as run on the controller's host."""
        ns = self.nodes[0].netns
        return ["nsenter", f"--net=/run/netns/{ns}", *args] if ns else list(args)

    def run(self, args: list[str], timeout: float = 60, check: bool = True, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        return _sh(self.client(args), timeout=timeout, check=check, env=env or self.env, **kw)

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 60) -> "Cluster":
        for d in ("munge", "munge-run", "state", "spool", "log", "node-local"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.base / "spool" / n.name).mkdir(exist_ok=True)
        try:
            self._netns_up()
            self._munge_up(timeout)
            self._write_conf()
            self._daemon("slurmctld", self.nodes[0], ["slurmctld", "-D", "-f", str(self.conf)])
            for n in self.nodes:
                self._daemon(f"slurmd-{n.name}", n, ["slurmd", "-D", "-f", str(self.conf), "-N", n.name])
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _netns_up(self) -> None:
        if not any(n.netns for n in self.nodes):
            return
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter") or not shutil.which("unshare"):
            raise SlurmUnavailable("two-node cluster needs root, iproute2 and util-linux (nsenter, unshare)")
        a, b = self.nodes
        p = _sh(["ip", "netns", "add", a.netns], check=False)
        if p.returncode != 0:
            raise SlurmUnavailable(f"cannot create network namespaces here: {p.stderr.strip()}")
        _sh(["ip", "netns", "add", b.netns])
        tag = a.netns[-6:]
        self.veth = (f"ua{tag}", f"ub{tag}")  # interface names: at most 15 characters
        _sh(["ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1]])
        hosts = [l for l in Path("/etc/hosts").read_text().splitlines() if l.strip()]
        hosts += [f"{n.addr} {n.name}" for n in self.nodes]
        (self.base / "hosts").write_text("\n".join(hosts) + "\n")
        for n, dev in zip(self.nodes, self.veth):
            _sh(["ip", "link", "set", dev, "netns", n.netns])
            _sh(["ip", "-n", n.netns, "addr", "add", f"{n.addr}/24", "dev", dev])
            _sh(["ip", "-n", n.netns, "link", "set", "lo", "up"])
            _sh(["ip", "-n", n.netns, "link", "set", dev, "up"])
            n.local_dir = self.base / "nodes" / n.name
            n.local_dir.mkdir(parents=True, exist_ok=True)

    def _in_node(self, node: Node, args: list[str]) -> list[str]:
        """``args`` as a process of ``node``: its network namespace, host name, /etc/hosts and local dir.

        nsenter rather than ``ip netns exec``: the latter remounts /sys, which hides /sys/fs/cgroup, and
        slurmd 22.05 refuses to start without it ("Unable to initialize cgroup plugin")."""
        if not node.netns:
            return args
        setup = (f"hostname {node.name} && mount --bind {self.base}/hosts /etc/hosts && "
                 f"mount --bind {node.local_dir} {self.node_local} && exec \"$@\"")
        return ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount", "--propagation",
                "private", "bash", "-c", setup, "bash", *args]

    def _munge_up(self, timeout: float) -> None:
        key = self.base / "munge" / "munge.key"
        os.chmod(self.base / "munge", 0o700)
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        m = self.base / "munge"
        # -F: foreground, so the Popen pid is munged's; --force: past a stale socket of an unclean stop
        self.procs["munged"] = subprocess.Popen(
            ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
            stdout=open(self.log_dir / "munged.out", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        os.chmod(m, 0o755)  # the socket must be reachable; the key stays 0400
        deadline = time.time() + timeout
        while True:
            enc = subprocess.run(["munge", "-S", str(self.munge_socket), "-n"], capture_output=True, timeout=10)
            if enc.returncode == 0 and subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=enc.stdout,
                                                      capture_output=True, timeout=10).returncode == 0:
                return
            if self.procs["munged"].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"munged did not come up:\n{self._tail(m / 'munged.log')}")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        b, head = self.base, self.nodes[0]
        lines = [
            "# written by tests/_slurm_cluster.py",
            f"ClusterName=uae{random.randrange(10**6)}",
            # slurmctld accepts a SlurmctldHost that is its host name or "localhost"
            f"SlurmctldHost={head.name if head.netns else 'localhost'}({head.addr})",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "MailProg=/bin/true",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/%n",
            f"SlurmctldPidFile={b}/slurmctld.pid", f"SlurmdPidFile={b}/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log", f"SlurmdLogFile={b}/log/slurmd-%n.log",
            f"SlurmctldPort={self.ctld_port}", f"SlurmdPort={self.slurmd_port}",
            # no systemd, no cgroups in this container: track processes by parent pid, bind nothing
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            f"JobCompType=jobcomp/filetxt", f"JobCompLoc={b}/log/jobcomp.log",  # `sacct -c` reads it
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            # schedule every 2 s, not every 60 s: a requeued job starts again within seconds
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2,bf_interval=1",
            "MpiDefault=none", "ReturnToService=2",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=10",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` for the tests
            f"FirstJobId={random.randrange(1000, 60000)}",
            "SlurmdParameters=config_overrides",  # the node is what we say (2 CPUs), whatever the machine has
        ]
        for n in self.nodes:
            lines.append(f"NodeName={n.name} NodeAddr={n.addr} CPUs={self.cpus} RealMemory=2000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(n.name for n in self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, name: str, node: Node, args: list[str]) -> None:
        # own session: a kill of the test's process group does not take the daemon down
        self.procs[name] = subprocess.Popen(self._in_node(node, args), env=self.env,
                                            stdout=open(self.log_dir / f"{name}.out", "w"), stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline, states = time.time() + timeout, {}
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} at startup:\n{self.log_tails()}")
            p = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=20)
            states = dict(l.split() for l in p.stdout.splitlines() if l.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout:.0f}s: {states}\n{self.log_tails()}")

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> str:
        p = self.run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd)
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict ({} when the controller no longer knows the job)."""
        p = self.run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=20)
        if p.returncode != 0:
            return {}
        out = {}
        for tok in p.stdout.split():
            k, _, v = tok.partition("=")
            out.setdefault(k, v)
        return out

    def wait_job(self, job_id: str, timeout: float) -> dict:
        """Poll until the job reaches a final state; on timeout cancel it and raise (nothing waits forever)."""
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL:
                return info
            time.sleep(0.5)
        self.run(["scancel", job_id], check=False)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {info}\n{self.log_tails()}")

    def wait_running(self, job_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") == "RUNNING":
                return info
            if info.get("JobState") in FINAL:
                raise AssertionError(f"job {job_id} ended before running: {info}")
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not running after {timeout:.0f}s")

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel the jobs and let their steps drain, then stop slurmd, slurmctld and munged by PID."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            q = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=20)
            ids = q.stdout.split()
            if ids:
                self.run(["scancel", *ids], check=False, timeout=20)
                deadline = time.time() + 30
                while time.time() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                    time.sleep(0.3)
        for name in [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None:
                continue
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            if p.stdout:
                p.stdout.close()
        self.procs.clear()
        self._netns_down()

    def _netns_down(self) -> None:
        for n in self.nodes:
            if not n.netns or not Path("/run/netns", n.netns).exists():
                continue
            # whatever still runs in our namespace is ours (a step that outlived its slurmd): end it by pid
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = _sh(["ip", "netns", "pids", n.netns], check=False).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), sig)
                    except ProcessLookupError:
                        pass
                if pids:
                    time.sleep(1)
            _sh(["ip", "netns", "del", n.netns], check=False)  # takes its end of the veth pair with it
        if self.veth and Path("/sys/class/net", self.veth[0]).exists():  # never moved into a namespace
            _sh(["ip", "link", "del", self.veth[0]], check=False)

    # ------------------------------------------------------------------ diagnostics
    @staticmethod
    def _tail(path: Path, n: int = 25) -> str:
        try:
            return f"--- {path}\n" + "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return f"--- {path} (missing)"

    def log_tails(self) -> str:
        return "\n".join(self._tail(p) for p in sorted(self.log_dir.glob("*.log")))

    def veth_bytes(self, node: Node) -> int:
        """Bytes received + sent on ``node``'s end of the veth pair."""
        dev = self.veth[self.nodes.index(node)]
        out = _sh(["ip", "-n", node.netns, "-s", "-j", "link", "show", dev]).stdout
        import json

        st = json.loads(out)[0]["stats64"]
        return st["rx"]["bytes"] + st["tx"]["bytes"]


def one_node(base: Path, cpus: int = 2) -> Cluster:
    return Cluster(Path(base), [Node("uae1", "127.0.0.1")], cpus=cpus, ctld_port=_free_port(),
                   slurmd_port=_free_port())


def two_nodes(base: Path, cpus: int = 2) -> Cluster:
    """n1 = 10.213.X.1 and n2 = 10.213.X.2 on a veth pair between two network namespaces of our own."""
    tag = f"{os.getpid() % 100000:05d}{random.randrange(10)}"
    x = random.randrange(1, 255)
    return Cluster(Path(base), [Node("n1", f"10.213.{x}.1", f"uaen1-{tag}"), Node("n2", f"10.213.{x}.2", f"uaen2-{tag}")],
                   cpus=cpus)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Run a local test cluster until Ctrl-C.")
    p.add_argument("cmd", choices=["up"])
    p.add_argument("dir", type=Path)
    p.add_argument("--two-nodes", action="store_true")
    a = p.parse_args(argv)
    ensure_installed()
    c = (two_nodes if a.two_nodes else one_node)(a.dir.resolve()).start()
    print(f"export SLURM_CONF={c.conf}" + (f"   # clients: nsenter --net=/run/netns/{c.nodes[0].netns} ..."
                                          if c.nodes[0].netns else ""), flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
