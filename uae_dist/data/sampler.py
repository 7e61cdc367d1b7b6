"""Distributed batch sampler that caps atoms (or edges) per batch.

Every rank derives the same epoch plan from (seed, epoch) alone, so no communication is needed:
the permutation is packed greedily into batches under the cap, batches are split until their count
divides the number of ranks (every index still appears exactly once per epoch; only when nothing is
left to split — every batch one oversized structure — are the first batches repeated), and rank r
takes batches r, r+R, … . ``load_state_dict`` resumes mid-epoch by skipping the batches already consumed.
"""
from __future__ import annotations

import numpy as np


class DistributedAtomBatchSampler:
    def __init__(self, natoms, max_atoms: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, nedges=None, max_edges: int | None = None):
        self.natoms = np.asarray(natoms, dtype=np.int64)
        self.nedges = None if nedges is None else np.asarray(nedges, dtype=np.int64)
        if max_atoms < 1:
            raise ValueError("max_atoms must be >= 1")
        if max_edges is not None and self.nedges is None:
            raise ValueError("max_edges needs nedges")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        if len(self.natoms) < num_replicas:
            raise ValueError(f"{len(self.natoms)} items cannot feed {num_replicas} ranks")
        self.max_atoms, self.max_edges = int(max_atoms), max_edges
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.epoch = 0
        self._skip = 0
        self._yielded = 0
        self._plan = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._plan = None
            self._skip = 0
        self.epoch = int(epoch)

    def plan(self) -> list[list[int]]:
        """All batches of the current epoch, for all ranks (identical on every rank)."""
        if self._plan is not None:
            return self._plan
        n = len(self.natoms)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        batches, cur, atoms, edges = [], [], 0, 0
        for k in order.tolist():
            a = int(self.natoms[k])
            e = 0 if self.nedges is None else int(self.nedges[k])
            over = atoms + a > self.max_atoms or (self.max_edges is not None and edges + e > self.max_edges)
            if cur and over:
                batches.append(cur)
                cur, atoms, edges = [], 0, 0
            cur.append(k)
            atoms += a
            edges += e
        if cur:
            batches.append(cur)
        # split the largest splittable batch until the count divides the number of ranks
        while len(batches) % self.num_replicas:
            big = max(range(len(batches)), key=lambda b: (len(batches[b]) > 1, int(self.natoms[batches[b]].sum())))
            b = batches[big]
            if len(b) < 2:
                # only single-structure batches left: repeat the first ones (as DistributedSampler
                # pads) rather than let one rank wait for a step the others never take
                batches += batches[: self.num_replicas - len(batches) % self.num_replicas]
                break
            half = len(b) // 2
            batches[big:big + 1] = [b[:half], b[half:]]
        self._plan = batches
        return batches

    def _mine(self) -> list[list[int]]:
        return self.plan()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self):
        mine = self._mine()
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for b in mine[skip:]:
            self._yielded += 1
            yield b

    def state_dict(self, batches_done: int | None = None) -> dict:
        """Position to resume from. Pass the number of batches the training loop has consumed this
        epoch (a DataLoader prefetches, so the sampler's own count runs ahead of it)."""
        return {"epoch": self.epoch, "batches_done": self._yielded if batches_done is None else int(batches_done),
                "seed": self.seed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_replicas", self.num_replicas) != self.num_replicas:
            raise ValueError(f"sampler state is for {state['num_replicas']} ranks, not {self.num_replicas}: "
                             "an epoch cannot be resumed on another world size (start the next epoch instead)")
        self.seed = state.get("seed", self.seed)
        self.set_epoch(state["epoch"])
        self._plan = None
        self._skip = int(state["batches_done"])
