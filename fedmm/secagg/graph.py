"""SecAgg+'s communication graph: who shares with whom, and how large a neighbourhood must be.

Bell et al. 2020: each client shares with a neighbourhood of about 2 log2 n + 1 others on a ring over a
random order, and t of its neighbourhood rebuild its secrets. Here the neighbourhood also grows until
independent dropout at the planned rate (``secagg-dropout``) fails a round with probability <= 2^-20.
"""

from __future__ import annotations

import math
import random

def neighbourhoods(node_ids: list[int], size: int, rng: random.Random) -> dict[int, tuple[int, ...]]:
    """Each node with its size-1 neighbours: its neighbours on a ring over a random order (SecAgg+'s graph)."""
    size = min(size | 1, len(node_ids))  # odd: as many neighbours on each side
    order = sorted(node_ids)
    rng.shuffle(order)
    half = size // 2
    out = {}
    for i, nid in enumerate(order):
        out[nid] = tuple(sorted({order[(i + k) % len(order)] for k in range(-half, half + 1)}))
    return out


FAILURE_PROBABILITY = 2.0**-20  # a round of a sparse graph fails under the planned dropout with at most this


def default_threshold(size: int) -> int:
    """A majority of a neighbourhood (SecAgg+'s t > k/2): two disjoint groups of its members can never both
    rebuild one client's secrets, so even a server that tells them different stories about who dropped gets
    at most one of b and s from honest clients; just under half may drop at any stage."""
    return max(2, size // 2 + 1)


def round_failure_bound(clients: int, size: int, threshold: int, dropout: float) -> float:
    """A union bound on the chance that some client's neighbourhood keeps fewer than t of its ``size`` - 1
    neighbours when each client vanishes independently with probability ``dropout`` after sharing keys."""
    keep = 1.0 - dropout
    tail = sum(math.comb(size - 1, k) * keep**k * dropout ** (size - 1 - k) for k in range(min(threshold, size)))
    return min(1.0, clients * tail)


def neighbourhood_size(clients: int, dropout: float = 0.0, threshold: int = 0) -> int:
    """SecAgg+'s graph for ``clients`` per round that survives ``dropout`` of them vanishing.

    The complete graph when few (<= 15); else the smallest odd ring neighbourhood, from Bell et al.'s
    2 ceil(log2 n) + 1 up, whose round fails with probability <= FAILURE_PROBABILITY when each client
    vanishes independently at the rate ``dropout`` (t: ``threshold``, 0 = a majority of the neighbourhood);
    the complete graph when no sparser one does.
    """
    if clients <= 15:
        return clients
    size = 2 * math.ceil(math.log2(clients)) + 1
    while size < clients:
        t = threshold or default_threshold(size)
        if t <= size and round_failure_bound(clients, size, t, dropout) <= FAILURE_PROBABILITY:
            return size
        size += 2
    return clients


def components(nodes: set[int], groups: dict[int, tuple[int, ...]]) -> list[set[int]]:
    """The connected parts of the graph over ``nodes`` whose edges are the neighbourhoods' (both ends in
    ``nodes``): after a round's dropouts, the contributors' masks cancel only within each part."""
    left, parts = set(nodes), []
    while left:
        start = left.pop()
        part, frontier = {start}, [start]
        while frontier:
            for other in groups[frontier.pop()]:
                if other in left:
                    left.discard(other)
                    part.add(other)
                    frontier.append(other)
        parts.append(part)
    return parts
