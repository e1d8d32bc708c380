"""Every QoS 1 copy of a fan-out arrives (benchmarks/complete.py; issue 21).

A rewrite of the broker's reader once left QoS 1 fan-out stalled, intermittently and under
load only, with most copies never sent (docs/PERFORMANCE.md). The broker's own reader
(imcli/broker/reader.py) and its fan-out where a message is published (imcli/broker/fanout.py)
are checked here at small sizes in each shape; ``python -m benchmarks.complete --runs N`` runs
the full sizes (100,000 copies) as often as one likes.
"""

from __future__ import annotations

import pytest

from benchmarks.complete import SHAPES, run


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_qos1_copy_arrives(shape: str) -> None:
    chosen = SHAPES[shape](10, 10)
    [(delivered, _)] = run(chosen, 1, stall=20.0)
    assert delivered == chosen.expected
