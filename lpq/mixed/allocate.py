"""Bit allocation: minimise Σ Ω_i Δ_i(c_i) subject to Σ bytes_i(c_i) ≤ budget, exactly.

This is a multiple-choice knapsack: every *unit* (one layer, or a tie group of layers that must take
the same choice) picks exactly one option (bytes, cost). It is solved by dynamic programming over the
budget, not greedily:

  dp_u[c] = least total cost of units 0..u whose extra bytes fit in c cells,
  dp_u[c] = min_k dp_{u-1}[c - w_uk] + cost_uk,

where a unit's *extra* bytes are its bytes above its cheapest option (so the 2-bit floor costs no
cells) and a cell is ``cell`` bytes. When the extra bytes of every option are multiples of one cell
that keeps the table below ``max_cells`` (the gcd of all extras usually does), the DP is exact in bytes
and returns the true optimum. Otherwise each option's extra bytes are rounded *up* to whole cells, so
the answer always fits the budget in true bytes, and a second DP with the extras rounded *down* (a
relaxation: every truly feasible choice stays feasible) gives a lower bound on the true optimum; the
result reports both (``objective`` - ``lower_bound`` is the most the rounding can have cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Hashable, Sequence

import numpy as np

from ..errors import SpecError

Option = tuple[int, float]  # (bytes, cost)


@dataclass
class Allocation:
    """choice[u] = index of the option picked for unit u."""

    choice: list[int]
    bytes: int
    objective: float
    lower_bound: float
    cell: int  # bytes per DP cell
    exact: bool  # True: the DP ran in exact bytes (objective is the proven optimum)


def _dp(extras: list[np.ndarray], costs: list[np.ndarray], capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """extras[u]: int cells of each option of unit u, costs[u]: float64 -> (dp [capacity+1], choice [U, capacity+1]).

    dp[c] = least cost with at most c cells used (non-increasing in c). Options are visited in order of
    increasing cells and replace the incumbent only when strictly cheaper, so among equal costs the
    fewest bytes win.
    """
    cap1 = capacity + 1
    dp = np.zeros(cap1, dtype=np.float64)
    choice = np.zeros((len(extras), cap1), dtype=np.int16)
    for u, (w, cost) in enumerate(zip(extras, costs)):
        new = np.full(cap1, np.inf)
        pick = np.zeros(cap1, dtype=np.int16)
        for k in np.argsort(w, kind="stable"):
            wk = int(w[k])
            if wk > capacity:
                continue
            cand = dp[: cap1 - wk] + cost[k]
            better = cand < new[wk:]
            new[wk:][better] = cand[better]
            pick[wk:][better] = k
        dp = new
        choice[u] = pick
    return dp, choice


def allocate(units: Sequence[Sequence[Option]], budget: int, max_cells: int = 200_000) -> Allocation:
    """Pick one option per unit minimising the summed cost with the summed bytes ≤ ``budget``.

    units: for each unit a list of (bytes >= 0 int, cost float) options. Raises SpecError if even the
    cheapest option of every unit does not fit.
    """
    if not units or any(len(u) == 0 for u in units):
        raise ValueError("every unit needs at least one option")
    budget = int(budget)
    b = [np.array([int(o[0]) for o in u], dtype=np.int64) for u in units]
    c = [np.array([float(o[1]) for o in u], dtype=np.float64) for u in units]
    floor = sum(int(x.min()) for x in b)
    if floor > budget:
        raise SpecError(f"the budget of {budget} bytes is below the smallest possible size, {floor} bytes")
    extras = [x - x.min() for x in b]
    spare = budget - floor
    nonzero = [int(v) for e in extras for v in e if v > 0]
    if not nonzero:  # every unit has a single size: nothing to decide but cost
        pick = [int(np.argmin(x)) for x in c]
        total = sum(float(x[k]) for x, k in zip(c, pick))
        return Allocation(pick, floor, total, total, 1, True)
    g = reduce(math.gcd, nonzero)
    if spare // g <= max_cells:
        cell, exact = g, True
    else:
        cell, exact = -(-spare // max_cells), False
    capacity = spare // cell
    up = [-(-e // cell) for e in extras]  # ceil: what the DP charges is never less than the truth
    dp, choice = _dp(up, c, capacity)
    pick = [0] * len(units)
    rest = capacity
    for u in range(len(units) - 1, -1, -1):
        k = int(choice[u, rest])
        pick[u] = k
        rest -= int(up[u][k])
    total_bytes = sum(int(x[k]) for x, k in zip(b, pick))
    objective = float(sum(float(x[k]) for x, k in zip(c, pick)))
    assert total_bytes <= budget, "allocation exceeds its budget"  # by construction of the ceil rounding
    if exact:
        lower = objective
    else:
        down = [e // cell for e in extras]
        lower = float(_dp(down, c, capacity)[0][capacity])
    return Allocation(pick, total_bytes, objective, min(lower, objective), cell, exact)


def tie_units(names: Sequence[str], ties: Sequence[Sequence[str]]) -> list[list[str]]:
    """Group layer names into units: each tie group (names that must share one choice) is one unit,
    every other name a unit of its own. Order follows ``names``; a name may sit in one group only."""
    owner: dict[str, int] = {}
    for gi, group in enumerate(ties):
        for n in group:
            if n in owner and owner[n] != gi:
                raise SpecError(f"layer {n} is in two tie groups: a layer can be tied to one group only")
            owner[n] = gi
    known = set(names)
    for n in owner:
        if n not in known:
            raise SpecError(f"tie group names {n}, which is not a quantized layer")
    units: list[list[str]] = []
    placed: dict[int, int] = {}
    for n in names:
        gi = owner.get(n)
        if gi is None:
            units.append([n])
        elif gi in placed:
            units[placed[gi]].append(n)
        else:
            placed[gi] = len(units)
            units.append([n])
    return units


def solve(
    options: dict[str, dict[Hashable, Option]],
    budget: int,
    ties: Sequence[Sequence[str]] = (),
    max_cells: int = 200_000,
) -> tuple[dict[str, Hashable], Allocation]:
    """Layer-level front end: options[name][key] = (bytes, cost) -> ({name: chosen key}, allocation).

    Layers of one tie group take the same key, chosen among the keys all of them have; their bytes and
    costs add up.
    """
    units = tie_units(list(options), ties)
    unit_keys: list[list[Hashable]] = []
    unit_opts: list[list[Option]] = []
    for members in units:
        keys = [k for k in options[members[0]] if all(k in options[m] for m in members[1:])]
        if not keys:
            raise SpecError(f"tied layers {', '.join(members)} have no width in common: untie them")
        unit_keys.append(keys)
        unit_opts.append([(sum(options[m][k][0] for m in members), sum(options[m][k][1] for m in members))
                          for k in keys])
    alloc = allocate(unit_opts, budget, max_cells)
    chosen = {m: unit_keys[u][alloc.choice[u]] for u, members in enumerate(units) for m in members}
    return chosen, alloc
