"""Fewer, rarer full garbage collections in the broker's process (issue 7: DM latency p99).

CPython's collector stops the whole process while it runs, and a full (generation 2)
collection walks every tracked object: about 190 per idle signed-in user in amqtt, so
240,000 objects and 100 to 180 ms with 1,000 users (measured with a loop-stall probe over
the DM benchmark: every event-loop stall above 100 ms was a generation 2 collection, and
after ``LightSession`` they found almost no garbage). By default one runs after every 10
generation 1 collections once the old generation has grown by a quarter, which a join of a
few hundred users or a few seconds of traffic brings about.

``calm_collector`` is called once the broker and its workers are up:
- everything allocated during start-up (modules, classes, pydantic schemas: ~50,000
  objects that live as long as the process) is moved out of the collector's sight with
  ``gc.freeze()``, so no later collection walks it again;
- a full collection waits for 100 generation 1 collections instead of 10 (CPython's
  quarter-growth rule still applies on top). Young collections are untouched: they stay
  short (a few ms) and still free most cyclic garbage; what lives long enough to reach
  the old generation waits up to ten times longer to be freed.
"""

from __future__ import annotations

import gc

FULL_COLLECTION_EVERY = 100  # generation 1 collections (CPython's default: 10)


def calm_collector() -> None:
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
