"""The page allocator of the unified pool: the one owner of which page belongs to whom.

A page is either free or owned by exactly one owner (a request's KV cache or a resident
adapter). Owners are opaque hashable keys; the allocator checks that pages are freed by the owner
that holds them, so a double free or a page owned twice is caught where it happens.
"""

from __future__ import annotations

from collections.abc import Hashable


class OutOfPagesError(RuntimeError):
    """More pages were asked for than are free (callers check num_free first)."""


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"the pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        # Stack of free page ids; low ids are handed out first (nicer to read in tests and dumps).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._owner: dict[int, Hashable] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owner)

    def allocate(self, count: int, owner: Hashable) -> list[int]:
        if count < 0:
            raise ValueError(f"cannot allocate {count} pages")
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        for p in pages:
            self._owner[p] = owner
        return pages

    def free(self, pages: list[int], owner: Hashable) -> None:
        for p in pages:
            held_by = self._owner.get(p)
            if held_by is None:
                raise RuntimeError(f"page {p} freed twice (it is not allocated)")
            if held_by != owner:
                raise RuntimeError(f"page {p} freed by {owner!r} but owned by {held_by!r}")
        for p in pages:
            del self._owner[p]
            self._free.append(p)

    def owner_of(self, page: int) -> Hashable | None:
        return self._owner.get(page)

    def pages_of(self, owner: Hashable) -> list[int]:
        """All pages of one owner (linear scan: for tests and accounting checks only)."""
        return sorted(p for p, o in self._owner.items() if o == owner)
