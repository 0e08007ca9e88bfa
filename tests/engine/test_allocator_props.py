"""Property tests of the page allocator and of the pool accounting under adapters and KV."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lorafleet.engine.memory.allocator import OutOfPagesError, PageAllocator

from .fakes import check_accounting, fake_step, make_request, make_scheduler, make_weights


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.num_pages = 24
        self.alloc = PageAllocator(self.num_pages)
        self.held: dict[str, list[int]] = {}
        self.ever_freed: set[int] = set()

    @rule(owner=st.sampled_from("abcdef"), count=st.integers(0, 10))
    def allocate(self, owner, count):
        if count > self.alloc.num_free:
            try:
                self.alloc.allocate(count, owner)
            except OutOfPagesError:
                return
            raise AssertionError("allocating more than is free must fail")
        pages = self.alloc.allocate(count, owner)
        self.held.setdefault(owner, []).extend(pages)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def free_some(self, data):
        owner = data.draw(st.sampled_from(sorted(o for o, p in self.held.items() if p)))
        pages = self.held[owner]
        k = data.draw(st.integers(1, len(pages)))
        chosen, self.held[owner] = pages[:k], pages[k:]
        self.alloc.free(chosen, owner)
        self.ever_freed.update(chosen)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def wrong_owner_free_is_refused(self, data):
        owner = data.draw(st.sampled_from(sorted(o for o, p in self.held.items() if p)))
        try:
            self.alloc.free([self.held[owner][0]], owner + "-impostor")
        except RuntimeError:
            return
        raise AssertionError("a page freed by another owner must be refused")

    @invariant()
    def no_page_owned_twice_and_accounting_exact(self):
        all_held = [p for pages in self.held.values() for p in pages]
        assert len(all_held) == len(set(all_held))
        assert self.alloc.num_used == len(all_held)
        assert self.alloc.num_free + self.alloc.num_used == self.num_pages
        for owner, pages in self.held.items():
            assert all(self.alloc.owner_of(p) == owner for p in pages)

    @invariant()
    def freed_pages_are_reusable(self):
        # Everything not held is allocatable again: take it all, check, give it back.
        free = self.alloc.num_free
        probe = self.alloc.allocate(free, "probe")
        assert len(set(probe)) == free
        assert not set(probe) & {p for pages in self.held.values() for p in pages}
        self.alloc.free(probe, "probe")


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class PoolMachine(RuleBasedStateMachine):
    """Requests with and without adapters come, run and are aborted; the pool stays exact."""

    def __init__(self):
        super().__init__()
        self.s = make_scheduler(num_pages=20, max_batched_tokens=16, slots=4)
        self.weights = {f"ad{i}": make_weights(rank=1 + i, seed=i) for i in range(5)}
        self.n = 0

    @rule(prompt=st.integers(1, 20), max_tokens=st.integers(1, 10), adapter=st.sampled_from([None, "ad0", "ad1", "ad2", "ad3", "ad4"]))
    def add(self, prompt, max_tokens, adapter):
        self.n += 1
        self.s.add_request(make_request(f"r{self.n}", prompt, max_tokens, (adapter, self.weights[adapter]) if adapter else None))

    @rule()
    def step(self):
        fake_step(self.s)

    @precondition(lambda self: bool(self.s.requests))
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.s.requests)))
        self.s.finish_request(rid, "abort")

    @invariant()
    def accounting(self):
        check_accounting(self.s)


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=40, stateful_step_count=50, deadline=None)
