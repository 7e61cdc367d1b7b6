import numpy as np
import pytest

from uae_dist.data.sampler import DistributedAtomBatchSampler


def samplers(natoms, world, **kw):
    return [DistributedAtomBatchSampler(natoms, num_replicas=world, rank=r, **kw) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [7, 50, 333])
def test_equal_steps_and_every_index_once(world, n):
    natoms = np.random.default_rng(n).integers(1, 120, n)
    for epoch in range(3):
        seen = []
        lens = set()
        for s in samplers(natoms, world, max_atoms=200, seed=3):
            s.set_epoch(epoch)
            batches = list(s)
            lens.add(len(batches))
            assert len(batches) == len(s)
            for b in batches:
                assert natoms[b].sum() <= 200 or len(b) == 1
            seen += [k for b in batches for k in b]
        assert len(lens) == 1, "every rank must take the same number of steps"
        assert sorted(seen) == list(range(n)), "every index exactly once per epoch"


def test_oversized_structure_gets_its_own_batch():
    natoms = np.array([5, 500, 5, 5])
    (s,) = samplers(natoms, 1, max_atoms=100)
    assert [1] in list(s)


def test_unsplittable_batches_are_padded_not_refused():
    natoms = np.array([300, 300, 300])
    plans = [list(s) for s in samplers(natoms, 2, max_atoms=256)]
    assert len(plans[0]) == len(plans[1]) == 2
    assert sorted({k for p in plans for b in p for k in b}) == [0, 1, 2]


def test_max_edges_cap():
    natoms = np.full(40, 10)
    nedges = np.full(40, 300)
    (s,) = samplers(natoms, 1, max_atoms=1000, nedges=nedges, max_edges=1000)
    assert all(nedges[b].sum() <= 1000 for b in s)


def test_shuffle_depends_on_seed_and_epoch_only():
    natoms = np.random.default_rng(0).integers(1, 50, 100)
    a, b = samplers(natoms, 1, max_atoms=150, seed=1)[0], samplers(natoms, 1, max_atoms=150, seed=1)[0]
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    c = samplers(natoms, 1, max_atoms=150, seed=2)[0]
    assert list(c) != list(b)
    d = samplers(natoms, 1, max_atoms=150, shuffle=False)[0]
    assert [k for bt in d for k in bt] == list(range(100))


@pytest.mark.parametrize("world", [1, 2])
def test_exact_mid_epoch_resume(world):
    natoms = np.random.default_rng(1).integers(1, 80, 211)
    for rank in range(world):
        full = DistributedAtomBatchSampler(natoms, 160, world, rank, seed=5)
        full.set_epoch(2)
        ref = list(full)
        it = iter(DistributedAtomBatchSampler(natoms, 160, world, rank, seed=5))
        s = DistributedAtomBatchSampler(natoms, 160, world, rank, seed=5)
        s.set_epoch(2)
        it = iter(s)
        first = [next(it) for _ in range(4)]
        state = s.state_dict()
        assert state["chain"] == [[world, 4 * world]] and state["epoch"] == 2
        # a fresh sampler (new process) resumes from the saved position
        t = DistributedAtomBatchSampler(natoms, 160, world, rank, seed=0)
        t.load_state_dict(state)
        rest = list(t)
        assert first + rest == ref
        t.set_epoch(3)
        assert len(list(t)) > 0 and t.state_dict(0)["chain"] == [[world, 0]]


@pytest.mark.parametrize("old,new", [((2, 1), (1, 1)), ((1, 3), (2, 1)), ((2, 2), (3, 2))])
def test_resume_on_other_world_size_or_accumulation_redeals_the_rest(old, new):
    """Every structure of the interrupted epoch is taken exactly once across the two runs, every
    rank of the new run takes the same number of steps, and steps do not cross the epoch."""
    natoms = np.random.default_rng(3).integers(1, 60, 301)
    (r0, a0), (r1, a1) = old, new
    olds = [DistributedAtomBatchSampler(natoms, 120, r0, r, seed=2, grad_accum=a0)
            for r in range(r0)]
    for o in olds:
        o.set_epoch(1)
    done_steps = 3
    consumed = [i for o in olds for b in o._mine()[:done_steps * a0] for i in b]
    state = olds[0].state_dict(batches_done=done_steps * a0)
    news = [DistributedAtomBatchSampler(natoms, 120, r1, r, grad_accum=a1) for r in range(r1)]
    for n in news:
        n.load_state_dict(state)
    rest = [i for n in news for b in n for i in b]
    assert sorted(consumed + rest) == list(range(len(natoms)))
    assert len({len(n) for n in news}) == 1 and len(news[0]) % a1 == 0
    frac = news[0].epoch_fraction(0)
    assert frac == pytest.approx(len(consumed) / len(natoms))


def test_structure_and_edge_caps_and_step_batches():
    natoms = np.random.default_rng(4).integers(1, 30, 200)
    nedges = natoms * 40
    s = DistributedAtomBatchSampler(natoms, None, 2, 0, max_structures=7, nedges=nedges,
                                    max_edges=3000, grad_accum=2)
    plan = s.plan()
    assert len(plan) % 4 == 0
    assert all(len(b) <= 7 and (nedges[b].sum() <= 3000 or len(b) == 1) for b in plan)
    assert s.step_batches(1) == plan[4:8] and s.steps() == len(plan) // 4
    from uae_dist.data.sampler import eval_batches

    ev = [eval_batches(natoms, 3, r, max_atoms=100) for r in range(3)]
    assert sorted(i for e in ev for b in e for i in b) == list(range(200))  # once, no padding


def test_bad_arguments():
    with pytest.raises(ValueError):
        DistributedAtomBatchSampler([1, 2], 0)
    with pytest.raises(ValueError, match="set max_atoms"):
        DistributedAtomBatchSampler([1, 2], None)
    with pytest.raises(ValueError):
        DistributedAtomBatchSampler([1], 10, num_replicas=2, rank=0)
    with pytest.raises(ValueError):
        DistributedAtomBatchSampler([1, 2], 10, num_replicas=2, rank=2)
