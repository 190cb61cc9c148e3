"""The named tolerances of the statistical tests and their one chi-square helper.

Each statistical check is set to fail by chance rarely: an estimate with a standard error
must lie within ``Z_SIGMAS`` of the exact value, and a chi-square statistic below its
``1 − FAILURE_RATE`` quantile.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from scipy.stats import chi2

Z_SIGMAS = 4.0  # |estimate − exact| < Z_SIGMAS · standard error (two-sided p ≈ 6e-5)
FAILURE_RATE = 1e-3  # false-alarm budget of each chi-square test
MIN_EXPECTED = 5.0  # chi-square cells expecting fewer samples are pooled into one


def chi_square(
    samples: Iterable[Any], probs: Mapping[Hashable, float], n: float | None = None
) -> tuple[float, float]:
    """(statistic, its 1 − FAILURE_RATE quantile) of the samples' fit to ``probs``.

    ``samples`` are outcomes (a list, e.g. token ids, counts as its tuple); ``n`` is the
    sample size the frequencies stand for (default: how many there are; MCMC passes its
    effective sample size). Cells expecting fewer than ``MIN_EXPECTED`` are pooled, and a
    pool too small to stand alone is folded into the smallest cell.

    Example:
        >>> stat, limit = chi_square([0] * 50 + [1] * 50, {0: 0.5, 1: 0.5})
        >>> stat, stat < limit
        (0.0, True)
    """
    counts = Counter(tuple(s) if isinstance(s, list) else s for s in samples)
    total = sum(counts.values())
    n = total if n is None else n
    outside = [k for k in counts if probs.get(k, 0.0) <= 0.0]
    assert not outside, f"samples outside the distribution's support: {outside[:5]}"
    freq = {k: c / total for k, c in counts.items()}
    big = [k for k, p in probs.items() if n * p >= MIN_EXPECTED]
    cells = [(freq.get(k, 0.0), probs[k]) for k in big]
    rest = (1.0 - sum(o for o, _ in cells), sum(probs.values()) - sum(e for _, e in cells))
    if n * rest[1] >= MIN_EXPECTED:
        cells.append(rest)
    elif rest[1] > 0 or rest[0] > 0:  # too small to stand alone: fold it into the smallest
        i = min(range(len(cells)), key=lambda j: cells[j][1])
        cells[i] = (cells[i][0] + rest[0], cells[i][1] + rest[1])
    stat = n * sum((o - e) ** 2 / e for o, e in cells)
    return stat, float(chi2.ppf(1 - FAILURE_RATE, len(cells) - 1))
