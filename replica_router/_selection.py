"""Strategies that pick one replica among those fit to serve a read."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Protocol

from ._nodes import Node

__all__ = [
    "LeastInFlight",
    "RandomChoice",
    "RoundRobin",
    "Selector",
    "Weighted",
    "make_selector",
]


class Selector(Protocol):
    """Picks a node among candidates; never called with an empty sequence."""

    def select(self, candidates: Sequence[Node]) -> Node: ...


class RoundRobin:
    """Each candidate in turn."""

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, candidates: Sequence[Node]) -> Node:
        return candidates[next(self._counter) % len(candidates)]


class RandomChoice:
    """A uniformly random candidate."""

    __slots__ = ("_random",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def select(self, candidates: Sequence[Node]) -> Node:
        return self._random.choice(candidates)


class LeastInFlight:
    """The less busy of two random candidates (power of two choices), ties by latency."""

    __slots__ = ("_random",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def select(self, candidates: Sequence[Node]) -> Node:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._random.sample(candidates, 2)
        sa, sb = a.state, b.state
        if sa.in_flight != sb.in_flight:
            return a if sa.in_flight < sb.in_flight else b
        return a if (sa.latency or 0.0) <= (sb.latency or 0.0) else b


class Weighted:
    """A random candidate, in proportion to its configured weight."""

    __slots__ = ("_random",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def select(self, candidates: Sequence[Node]) -> Node:
        return self._random.choices(candidates, weights=[n.weight for n in candidates])[0]


def make_selector(name: str) -> Selector:
    """The strategy for a ``REPLICA_ROUTER_STRATEGY`` value."""
    strategies: dict[str, type[Selector]] = {
        "round_robin": RoundRobin,
        "random": RandomChoice,
        "least_in_flight": LeastInFlight,
        "weighted": Weighted,
    }
    return strategies[name]()
