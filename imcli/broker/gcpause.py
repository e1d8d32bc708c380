"""Short, rare garbage-collection pauses in ``imcli serve`` (issue 7: DM p99, join storms).

CPython's collector stops the whole process while it runs, and a full (generation 2)
collection walks every tracked object: about 190 per idle signed-in user in amqtt. With a
loop-stall probe in the broker's process (every event-loop callback over 15 ms, every
collection over 5 ms):

- DM benchmark, 1,000 users (240,000 objects): every stall above 100 ms was a full
  collection, 100 to 180 ms each;
- capacity benchmark, 10,000 users (about 2 million objects): nine full collections took
  9.9 s in all, 0.6 to 3.6 s each, most of them finding nothing to free. By default one
  runs whenever the old generation has grown by a quarter, so a heap that grows from
  nothing to 2 million objects is walked again and again during a join storm.

``calm_collector`` is called once the broker listens and its workers are up:

- it collects, then freezes (``gc.freeze()``) what start-up allocated, and after every
  later full collection it freezes again what survived it: a full collection then walks
  only what was allocated since the one before, not every session again;
- a full collection waits for 100 generation 1 collections instead of 10 (CPython's
  quarter-growth rule still applies on top);
- frozen objects are still freed by reference counting as usual; only a *cycle* among
  them would stay until the next compaction: every ``COMPACT_EVERY`` seconds a thread
  unfreezes everything and runs one full collection (a single pause as long as one
  default full collection: about 1 s with 10,000 users on this machine).

Young collections are untouched: they stay short (a few ms) and free most cyclic garbage.
Sessions and their queues are freed by reference counting (``SessionState`` holds its
session weakly), so freezing them does not keep them alive.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

FULL_COLLECTION_EVERY = 100  # generation 1 collections (CPython's default: 10)
COMPACT_EVERY = 900.0  # seconds between collections of everything, frozen objects included

_started = False


def _freeze_after_full_collection(phase: str, info: dict[str, Any]) -> None:
    # right after a full collection the young generations are empty: nothing short-lived is frozen
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def _compact() -> None:
    while True:  # a daemon thread: ends with the process
        time.sleep(COMPACT_EVERY)
        gc.unfreeze()
        gc.collect()  # freezes again through the callback


def calm_collector() -> None:
    """Apply the policy above to this process (once; it lasts as long as the process)."""
    global _started  # noqa: PLW0603 - the policy is per process
    if _started:
        return
    _started = True
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
    gc.callbacks.append(_freeze_after_full_collection)
    gc.collect()
    threading.Thread(target=_compact, name="gc-compact", daemon=True).start()
