"""Contiguous split of an ordered list of work items across ranks, balanced by a cost (bytes)."""

from __future__ import annotations

from collections.abc import Sequence


def split_by_cost(costs: Sequence[int], parts: int) -> list[range]:
    """``parts`` contiguous index ranges covering ``costs`` in order, each near ``sum(costs) / parts``.

    Boundary k goes after the item where the running total first reaches ``k * total / parts``, so no
    rank holds more than its fair share plus one item. Some ranges are empty when items are fewer than parts.
    """
    total = sum(costs)
    bounds = [0]
    running = 0
    k = 1
    for i, cost in enumerate(costs):
        running += cost
        while k < parts and running * parts >= k * total and total > 0:
            bounds.append(i + 1)
            k += 1
    bounds += [len(costs)] * (parts + 1 - len(bounds))
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]
