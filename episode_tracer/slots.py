"""Episode identities in the kernel: slots recycled with a generation.

Every running episode has one identity in the kernel maps (episode_cgroups
values, tracked values, slot_mask keys; layout in episode_tracer/bpf/events.h): 24 bits,
``generation << SLOT_BITS | index``. Index 0 means "an episode not
registered yet" (the rules of every episode), indices 1..capacity are handed
out to running episodes and come back when they end (least recently freed
first), each reuse with the next generation of that index. A kernel entry an
ended episode left behind (a tracked process that outlived it) therefore
never names the episode that gets the index next; before an index's
generation comes round again, ``on_wrap(index)`` lets the caller forget every
kernel entry of that index. The canary's identity (``SLOT_CANARY``) has an
index above every index an episode can get.

At capacity ``take`` raises ``SlotsExhausted``: the episode is refused
(never left unscoped or sharing another episode's identity).

Pure: no kernel access, no clock.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from .events import EPISODES_MAX, IDENT_MASK, SLOT_BITS, SLOT_CANARY, SLOT_INDEX_MASK

GEN_COUNT = (IDENT_MASK >> SLOT_BITS) + 1  # generations of one index (2048)
DEFAULT_MAX_EPISODES = 4096


class SlotsExhausted(RuntimeError):
    pass


def identity(index: int, gen: int) -> int:
    return ((gen % GEN_COUNT) << SLOT_BITS) | index


def index_of(ident: int) -> int:
    return ident & SLOT_INDEX_MASK


def generation_of(ident: int) -> int:
    return (ident & IDENT_MASK) >> SLOT_BITS


class SlotTable:
    """Hands out episode identities; ``capacity`` of them at once.

    start_gen: the generation of each index's first use (tests and the
    bench start near the top, to cross the wrap in a few episodes)."""

    def __init__(self, capacity: int = DEFAULT_MAX_EPISODES, start_gen: int = 0,
                 on_wrap: Callable[[int], None] | None = None):
        if not isinstance(capacity, int) or not 1 <= capacity <= EPISODES_MAX:
            raise ValueError(f"max_episodes must be 1..{EPISODES_MAX} (the kernel maps' limit), got {capacity!r}")
        if not isinstance(start_gen, int) or start_gen < 0:
            raise ValueError(f"slot start generation must be a non-negative integer, got {start_gen!r}")
        self.capacity = capacity
        self.start_gen = start_gen % GEN_COUNT
        self.on_wrap = on_wrap
        self._free: deque[int] = deque(range(1, capacity + 1))
        self._uses: dict[int, int] = {}  # index -> times handed out
        self.in_use: dict[int, str] = {}  # index -> episode id
        self.taken_total = 0
        self.refused_total = 0
        self.wraps = 0  # generation values that came round again (kernel entries swept first)
        assert index_of(SLOT_CANARY) > capacity

    def __len__(self) -> int:
        return len(self.in_use)

    def take(self, episode: str) -> int:
        """A fresh identity for `episode`; SlotsExhausted at capacity."""
        if not self._free:
            self.refused_total += 1
            raise SlotsExhausted(
                f"episode {episode!r} refused: the tracer already runs {len(self.in_use)} episodes, "
                f"its limit (--max-episodes {self.capacity}, at most {EPISODES_MAX} in the kernel maps)")
        index = self._free.popleft()
        uses = self._uses.get(index, 0)
        if uses and uses % GEN_COUNT == 0:
            # this index's generations come round again: no leftover kernel
            # entry of an earlier use may survive to name the new episode
            self.wraps += 1
            if self.on_wrap is not None:
                self.on_wrap(index)
        self._uses[index] = uses + 1
        self.in_use[index] = episode
        self.taken_total += 1
        return identity(index, self.start_gen + uses)

    def give_back(self, ident: int) -> None:
        index = index_of(ident)
        if self.in_use.pop(index, None) is not None:
            self._free.append(index)

    def stats(self) -> dict[str, int]:
        return {"running": len(self.in_use), "capacity": self.capacity, "taken_total": self.taken_total,
                "refused_total": self.refused_total, "wraps": self.wraps}
