"""What the topic parse cache (imcli/core/topics.py) costs: CPU per parse, and what a full garbage
collection spends walking a full cache (tenth session, helper odds6).

    python -m benchmarks.parsecache [--calls 2000000] [--repeat 5]

Three caches of the same 8,192 topics (a cache as full as ``PARSE_CACHE`` allows), each measured in
``time.process_time`` (CPU, so the figure moves little with the machine's load; the best of
``--repeat``):

* ``lru``: ``functools.lru_cache``, what the parse uses (its link objects turn out not to be tracked by
  the collector, and its ``(prefix, topic)`` keys are tuples of strings, which the collector untracks);
* ``dict``: a plain dict of topic -> ``Topic``, cleared when full (the dict and its ``Topic`` values
  are walked; the link objects are gone);
* ``tuple``: a dict of topic -> a tuple of strings (the collector untracks a tuple of untracked
  items), a ``Topic`` made from it on each hit.

For each: nanoseconds per cached parse through ``Topics.parse``'s shape (a length check, the lookup),
the objects the cache adds to those the collector tracks, and the extra CPU of one full collection
(``gc.collect()``) with the cache full and before it was filled, in microseconds (the difference is
within the noise of a loaded machine: compare the tracked objects). One JSON line per cache.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time
from collections.abc import Callable

from imcli.core.topics import PARSE_CACHE, PARSE_CACHED_UP_TO, Topic, TopicKind, _parse

PREFIX = "im"
KINDS = {k.value: k for k in TopicKind}


def topics(n: int) -> list[str]:
    return [f"{PREFIX}/room/room{i % 500}/user{i}" for i in range(n)]


def make_lru() -> Callable[[str], Topic | None]:
    cached = functools.lru_cache(maxsize=PARSE_CACHE)(_parse)

    def parse(topic: str) -> Topic | None:
        if len(topic) > PARSE_CACHED_UP_TO:
            return _parse(PREFIX, topic)
        return cached(PREFIX, topic)

    return parse


def make_dict() -> Callable[[str], Topic | None]:
    cache: dict[str, Topic | None] = {}

    def parse(topic: str) -> Topic | None:
        try:
            return cache[topic]
        except KeyError:
            pass
        found = _parse(PREFIX, topic)
        if len(topic) <= PARSE_CACHED_UP_TO:
            if len(cache) >= PARSE_CACHE:
                cache.clear()
            cache[topic] = found
        return found

    return parse


def make_tuple() -> Callable[[str], Topic | None]:
    cache: dict[str, tuple[str, str | None, str | None, str | None, str | None] | None] = {}

    def parse(topic: str) -> Topic | None:
        try:
            row = cache[topic]
        except KeyError:
            found = _parse(PREFIX, topic)
            if len(topic) <= PARSE_CACHED_UP_TO:
                if len(cache) >= PARSE_CACHE:
                    cache.clear()
                cache[topic] = (
                    None if found is None else (found.kind.value, found.sender, found.owner, found.name, found.key)
                )
            return found
        return None if row is None else Topic(KINDS[row[0]], row[1], row[2], row[3], row[4])

    return parse


def collect_cpu(repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        gc.collect()
        best = min(best, time.process_time() - start)
    return best


def measure(name: str, make: Callable[[], Callable[[str], Topic | None]], calls: int, repeat: int) -> dict[str, object]:
    names = topics(PARSE_CACHE)
    gc.collect()
    tracked_before = len(gc.get_objects())
    empty_collect = collect_cpu(repeat)
    parse = make()
    for t in names:
        parse(t)
    gc.collect()
    gc.collect()  # tuples of untracked items are untracked by the collections that see them
    tracked = len(gc.get_objects()) - tracked_before
    full_collect = collect_cpu(repeat)
    best = float("inf")
    hot = names * (calls // len(names))
    for _ in range(repeat):
        start = time.process_time()
        for t in hot:
            parse(t)
        best = min(best, (time.process_time() - start) / len(hot))
    del parse
    return {
        "cache": name,
        "ns_per_cached_parse": round(best * 1e9, 1),
        "tracked_objects_added": tracked,
        "full_collection_us_empty": round(empty_collect * 1e6),
        "full_collection_us_cache_full": round(full_collect * 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name, make in (("lru", make_lru), ("dict", make_dict), ("tuple", make_tuple)):
        print(json.dumps(measure(name, make, args.calls, args.repeat)), flush=True)


if __name__ == "__main__":
    main()
