"""Batch samplers that cap atoms, edges or structures per batch.

Training (``DistributedAtomBatchSampler``): every rank derives the same epoch plan from (seed,
epoch) alone, so no communication is needed. The permutation is packed greedily into batches under
the caps; batches are split until their count divides ``num_replicas * grad_accum`` (every index
still appears exactly once per epoch; only when nothing is left to split — every batch a single
structure — are the first batches repeated), so every rank takes the same number of steps and an
optimizer step's accumulation window never crosses an epoch. Rank r takes batches r, r+R, …; the
global batches of optimizer step s are ``plan[s*R*A:(s+1)*R*A]`` (R ranks, A accumulation steps).

``load_state_dict`` resumes mid-epoch: the batches the interrupted run had not reached are kept
in order (re-split only if the number of ranks or accumulation steps changed) and dealt to the
ranks, so no structure of the interrupted epoch is lost or repeated; on the same world size the
continuation is exactly the uninterrupted run's.

Evaluation (``eval_batches``): the split in order, packed under the caps, dealt round-robin with no
padding (ranks may get different numbers of batches; every structure is evaluated exactly once).
"""
from __future__ import annotations

import numpy as np


def pack(order, natoms, nedges=None, max_atoms=None, max_edges=None,
         max_structures=None) -> list[list[int]]:
    """Greedy packing of ``order`` into batches under the caps (a single item may exceed them)."""
    batches, cur, atoms, edges = [], [], 0, 0
    for k in order:
        a = int(natoms[k])
        e = 0 if nedges is None else int(nedges[k])
        over = ((max_atoms is not None and atoms + a > max_atoms)
                or (max_edges is not None and edges + e > max_edges)
                or (max_structures is not None and len(cur) >= max_structures))
        if cur and over:
            batches.append(cur)
            cur, atoms, edges = [], 0, 0
        cur.append(int(k))
        atoms += a
        edges += e
    if cur:
        batches.append(cur)
    return batches


def split_to_multiple(batches: list[list[int]], natoms, divisor: int) -> list[list[int]]:
    """Split the largest splittable batch until ``len(batches) % divisor == 0``."""
    batches = list(batches)
    while len(batches) % divisor:
        big = max(range(len(batches)),
                  key=lambda b: (len(batches[b]) > 1, int(natoms[batches[b]].sum())))
        b = batches[big]
        if len(b) < 2:
            # only single-structure batches left: repeat the first ones (as DistributedSampler
            # pads) rather than let one rank wait for a step the others never take
            return batches + batches[: divisor - len(batches) % divisor]
        half = len(b) // 2
        batches[big:big + 1] = [b[:half], b[half:]]
    return batches


class DistributedAtomBatchSampler:
    def __init__(self, natoms, max_atoms: int | None = None, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, nedges=None, max_edges: int | None = None,
                 max_structures: int | None = None, grad_accum: int = 1):
        self.natoms = np.asarray(natoms, dtype=np.int64)
        self.nedges = None if nedges is None else np.asarray(nedges, dtype=np.int64)
        for name, v in (("max_atoms", max_atoms), ("max_edges", max_edges),
                        ("max_structures", max_structures), ("grad_accum", grad_accum)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if max_atoms is None and max_edges is None and max_structures is None:
            raise ValueError("set max_atoms, max_edges or max_structures")
        if max_edges is not None and self.nedges is None:
            raise ValueError("max_edges needs nedges")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        if len(self.natoms) < num_replicas:
            raise ValueError(f"{len(self.natoms)} items cannot feed {num_replicas} ranks")
        self.caps = dict(max_atoms=max_atoms, max_edges=max_edges, max_structures=max_structures)
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.grad_accum = int(grad_accum)
        self.epoch = 0
        self._yielded = 0
        # how this epoch's plan came to be: [(divisor, global batches consumed), …] of the runs
        # before a resume; empty for an epoch started by this run
        self._chain: list[tuple[int, int]] = []
        self._plan = None

    @property
    def divisor(self) -> int:
        return self.num_replicas * self.grad_accum

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._plan, self._chain = None, []
        self.epoch = int(epoch)

    def _base_plan(self, divisor: int) -> list[list[int]]:
        n = len(self.natoms)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches = pack(order.tolist(), self.natoms, self.nedges, **self.caps)
        return split_to_multiple(batches, self.natoms, divisor)

    def plan(self) -> list[list[int]]:
        """All batches of the current epoch that this run takes, for all ranks (the same on every
        rank): the epoch's batches, less those consumed before a resume."""
        if self._plan is None:
            chain = self._chain
            p = self._base_plan(chain[0][0] if chain else self.divisor)
            for i, (_, consumed) in enumerate(chain):
                nxt = chain[i + 1][0] if i + 1 < len(chain) else self.divisor
                rest = p[consumed:]
                p = split_to_multiple(rest, self.natoms, nxt) if rest else []
            self._plan = p
        return self._plan

    def _mine(self) -> list[list[int]]:
        return self.plan()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return len(self._mine())

    def steps(self) -> int:
        """Optimizer steps in this run's plan of the epoch."""
        return len(self) // self.grad_accum

    def step_batches(self, step: int) -> list[list[int]]:
        """The global batches (every rank's) of optimizer step ``step`` of this run's plan."""
        d = self.divisor
        return self.plan()[step * d:(step + 1) * d]

    def epoch_fraction(self, batches_done: int) -> float:
        """Fraction of the epoch's structures consumed once this rank has taken ``batches_done``
        batches of the plan (for schedules that must not depend on the number of ranks)."""
        n = len(self.natoms)
        plan = self.plan()
        left = sum(len(b) for b in plan[batches_done * self.num_replicas:])
        return min(1.0, max(0.0, 1.0 - left / n))

    def __iter__(self):
        self._yielded = 0
        for b in self._mine():
            self._yielded += 1
            yield b

    def state_dict(self, batches_done: int | None = None) -> dict:
        """Position to resume from. Pass the number of batches the training loop has consumed this
        epoch on this rank (a DataLoader prefetches, so the sampler's own count runs ahead)."""
        done = self._yielded if batches_done is None else int(batches_done)
        chain = [list(c) for c in self._chain] + [[self.divisor, done * self.num_replicas]]
        return {"epoch": self.epoch, "seed": self.seed, "chain": chain,
                "num_replicas": self.num_replicas, "grad_accum": self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position, on any number of ranks and accumulation steps."""
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self._chain = [(int(d), int(c)) for d, c in state["chain"]]
        self._plan = None


def eval_batches(natoms, num_replicas: int = 1, rank: int = 0, nedges=None,
                 max_atoms=None, max_edges=None, max_structures=None) -> list[list[int]]:
    """This rank's evaluation batches: the items in order, packed, dealt round-robin, no padding."""
    order = range(len(natoms))
    batches = pack(order, np.asarray(natoms), None if nedges is None else np.asarray(nedges),
                   max_atoms, max_edges, max_structures)
    return batches[rank::num_replicas]
