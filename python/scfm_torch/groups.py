"""Rows of a batch in groups of similar length, as scfm's encoder runs them
(``worker/src/model/groups.rs``): each group is padded only to its own longest row."""

from __future__ import annotations

from typing import Optional, Sequence

#: Up to this fraction of the padded tokens must remain for grouping to be used.
WORTH = 0.9
#: The smallest group, in rows.
MIN_ROWS = 8


def length_groups(lengths: Sequence[int], max_groups: int = 4) -> Optional[list[tuple[list[int], int]]]:
    """The rows of these ``lengths`` (tokens per row, ``[CLS]`` included) in at most
    ``max_groups`` groups, longest first, that minimise the padded tokens (every group at
    least ``MIN_ROWS`` rows; boundaries every ``ceil(n / 256)`` rows), as
    ``[(rows, padded_length), ...]``; ``None`` when one group is best or grouping keeps more
    than ``WORTH`` of the padded tokens. The same choice as scfm's ``Groups::of``."""
    n = len(lengths)
    k_max = min(max_groups, n // MIN_ROWS)
    if k_max < 2:
        return None
    order = sorted(range(n), key=lambda r: (-int(lengths[r]), r))
    srt = [int(lengths[r]) for r in order]
    stride = -(-n // 256)

    def at(i: int) -> bool:
        return i == 0 or i == n or i % stride == 0

    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    cost[0][0] = 0
    for k in range(1, k_max + 1):
        for i in range(k * MIN_ROWS, n + 1):
            if not at(i):
                continue
            for j in range((k - 1) * MIN_ROWS, i - MIN_ROWS + 1):
                if not at(j) or cost[k - 1][j] == inf:
                    continue
                c = cost[k - 1][j] + (i - j) * srt[j]
                if c < cost[k][i]:
                    cost[k][i], cut[k][i] = c, j
    best_k = min(range(2, k_max + 1), key=lambda k: (cost[k][n], k))
    if cost[best_k][n] > WORTH * n * srt[0]:
        return None
    bounds, i = [n], n
    for k in range(best_k, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    bounds.reverse()
    return [(order[a:b], srt[a]) for a, b in zip(bounds[:-1], bounds[1:])]
