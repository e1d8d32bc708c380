"""A quantile with a confidence interval from order statistics, and the ratio of two such quantiles.

The interval is distribution-free: for ``n`` samples, the quantile ``q`` lies between the ``l``-th
and the ``u``-th smallest with the probability that a Binomial(n, q) count falls in ``[l, u)``. It
assumes the samples are independent; a room ping's are not quite (one stall of the broker delays
the pings on their way together), so the interval is the least uncertainty there is, and the spread
of the figure from one transfer to the next (``benchmarks/filesping.py``) is the check on it.

With 100 samples a p99 has no upper bound at 95 % (the largest sample is below the true p99 with
probability 0.99 ** 100 = 37 %): the ratio of two such p99s says nothing about a 2x target.
"""

from __future__ import annotations

import math
import statistics


def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile as ``statistics.quantiles`` (the exclusive method) gives it; None below 10 samples."""
    if len(values) < 10:
        return None
    return statistics.quantiles(values, n=1000)[round(q * 1000) - 1]


def _binomial_cdf(n: int, p: float) -> list[float]:
    """P(B <= k) for k = 0..n, B ~ Binomial(n, p), through logarithms (n in the tens of thousands)."""
    log_p, log_q = math.log(p), math.log1p(-p)
    pmf = [math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
           for k in range(n + 1)]  # fmt: skip
    out, total = [], 0.0
    for x in pmf:
        total += x
        out.append(total)
    return out


def interval(values: list[float], q: float, level: float = 0.95) -> tuple[float | None, float | None]:
    """A ``level`` confidence interval for the ``q`` quantile: (lower, upper), either None when the
    samples are too few to bound that side."""
    n = len(values)
    if n == 0:
        return None, None
    ordered = sorted(values)
    cdf = _binomial_cdf(n, q)
    tail = (1 - level) / 2
    # lower: the largest l with P(B < l) <= tail (order statistics counted from 1)
    lower_rank = max((k + 1 for k in range(n + 1) if cdf[k] <= tail), default=0)
    # upper: the smallest u with P(B >= u) = 1 - P(B <= u - 1) <= tail
    upper_rank = next((k + 1 for k in range(n) if 1 - cdf[k] <= tail), None)
    lower = ordered[lower_rank - 1] if lower_rank >= 1 else None
    upper = ordered[upper_rank - 1] if upper_rank is not None and upper_rank <= n else None
    return lower, upper


def ratio_interval(
    top: tuple[float | None, float | None], bottom: tuple[float | None, float | None]
) -> tuple[float | None, float | None]:
    """Bounds for ``top / bottom`` from each one's interval (conservative: both at their extremes)."""
    low = top[0] / bottom[1] if top[0] is not None and bottom[1] else None
    high = top[1] / bottom[0] if top[1] is not None and bottom[0] else None
    return low, high


def r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)
