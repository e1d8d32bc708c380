"""The embedded broker's selector on asyncio's loop (Linux): a poll that returns thousands of ready
sockets is served a bounded slice per loop round, live connections before closing ones.

asyncio runs one callback per ready socket, all of one poll's in the same loop round, before
anything else: when 10,000 users leave at once, one poll returns 5,000 to 8,300 sockets (a DISCONNECT
and its FIN each), about 20 us of reading each, and a PINGREQ or a chat line that became readable
among them waits 100 to 200 ms. Bounding ``epoll_wait``'s maxevents does not help: epoll's ready list
is first in, first out, so a later socket still waits behind every earlier one (docs/PERFORMANCE.md,
issue 21, fourth and eighth sessions).

``LiveFirstSelector`` asks epoll for ``EPOLLRDHUP`` with every read interest, so a poll tells which
sockets' peers have closed (FIN seen: RDHUP, HUP or ERR); on the sliced path a socket whose waiting
bytes are exactly an MQTT DISCONNECT (``LAST_WORDS``, peeked) counts as closing too: a client leaving
writes it before its FIN, and a crowd leaving writes them all first. When a poll returns at most ``BOUND``
events and nothing waits from an earlier poll (nearly always), it returns them all, as
``selectors.EpollSelector`` does. Otherwise it returns at most ``BOUND`` a round: first the events of
sockets whose peer has not closed (chat, PINGREQs, writes, the listener), then the closing ones;
the rest wait here, in the order the polls returned them, and the loop polls without waiting until
none is left. A socket still closing is read in full before its end (its last PUBLISH is delivered):
it only waits its turn.

A socket left waiting is taken out of epoll's interest (``EPOLL_CTL_DEL``) until its turn: epoll is
level-triggered, and each poll returned every waiting socket again, about 0.5 us each a round, so
that a round's poll cost grew with the backlog (docs/PERFORMANCE.md, issue 21, ninth session). Once
taken, it is put back, with the interest its key has then, before the next poll (unless asyncio has
unregistered it meanwhile: a parked DISCONNECT pauses its reading), so an event dropped is never
lost: that poll returns it again if it still holds. While out, asyncio's ``modify`` changes only the
key (the interest is set when it is put back) and ``unregister`` only the bookkeeping. An event is
dropped when its key is no longer the one it was polled with (the fd unregistered, its number
reused by a new connection, or its interest changed by asyncio, which replaces the key): no callback
of a closed connection is run, and no new connection is handed an event of the old one.

A socket is peeked at once only if it was served in the last ``HOT_FOR`` to twice that seconds (a
chat, a client's PINGREQs, the stall probe's); the others a poll returns readable and open wait
unsorted, and at most ``PEEKS`` of them are peeked a round, in the order they were polled: the
first poll of 10,000 users leaving at once returned 8,000 of them, and peeking every one (about 3.5
us each, with its bookkeeping) made that poll's round 23 to 42 ms of CPU before any callback ran
(docs/PERFORMANCE.md, issue 21, tenth session). No closing socket is served while any polled socket
is still unsorted: one found live later is still served before every closing one.
"""

from __future__ import annotations

import contextlib
import math
import select
import selectors
import socket
import time
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

_ENDING = getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)

# fd -> the key it was polled with (its events apart, in ``_polled``: no tuple per waiting socket, which
# the collector would walk: a full collection in a mass leave walks what is young and alive)
Waiting = dict[int, selectors.SelectorKey]


def _events(event: int) -> int:
    """An epoll event as ``selectors``' mask (as ``EpollSelector.select`` reads it: HUP and ERR wake both)."""
    return (selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0) | (
        selectors.EVENT_READ if event & ~select.EPOLLOUT else 0
    )


# the masks of the events a poll returns most (a dict's lookup, not a call, per event of a large poll)
_MASKS = {event: _events(event) for event in (select.EPOLLIN, select.EPOLLOUT, select.EPOLLIN | select.EPOLLOUT)}

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def _peek(key: selectors.SelectorKey, size: int) -> bytes:
    """Up to ``size + 1`` of the bytes waiting on ``key``'s socket, left there (b"" if it is no socket).

    Through the socket of the asyncio transport that reads it when there is one (``key.data`` is
    asyncio's (reader, writer) handles; the reader's callback is the transport's bound method): about
    2 us, against 4 to 5 us for a socket object made on the fd and detached, which every new fd of a
    mass leave's first poll paid (docs/PERFORMANCE.md, issue 21, ninth session)."""
    data = key.data
    if type(data) is tuple and data:
        sock = getattr(getattr(getattr(data[0], "_callback", None), "__self__", None), "_sock", None)
        if type(sock) is socket.socket and sock.fileno() == key.fd:
            try:
                return sock.recv(size + 1, _PEEK)
            except OSError:
                return b""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=key.fd)
    except OSError:
        return b""
    try:
        return sock.recv(size + 1, _PEEK)
    except OSError:
        return b""
    finally:
        sock.detach()  # the fd stays its owner's


if hasattr(select, "epoll"):

    class LiveFirstSelector(selectors.EpollSelector):
        """``selectors.EpollSelector`` that returns at most ``BOUND`` events a poll, live sockets first
        (module docstring)."""

        # ready sockets served in one loop round: 5 to 10 ms of reads at 20 to 40 us each (500 at first;
        # 256 with the teardown gate's 25 ends a round kept the probe's round trips under 50 ms: PERFORMANCE.md)
        BOUND = 256
        # a socket whose waiting bytes are exactly these counts as closing too (an MQTT DISCONNECT: a
        # client leaving writes it, its FIN comes later; one MSG_PEEK each, on the sliced path only)
        LAST_WORDS: bytes | None = b"\xe0\x00"
        # sockets polled readable and open, not served lately, peeked a round at most (2 to 5 us each), and
        # only while the round's selector has used less than SORT_CPU seconds of CPU (a batch of SORT_BATCH
        # at least): the rest wait unsorted, and no closing socket is served before they are sorted
        PEEKS = 1024
        SORT_CPU = 0.002
        SORT_BATCH = 32
        # seconds: a socket served within the last HOT_FOR to twice that is peeked as soon as polled
        HOT_FOR = 1.0
        _EVENT_READ = select.EPOLLIN | select.EPOLLRDHUP  # the base class's register and modify use it
        # the stdlib's own (selectors' private attributes, not in typeshed): the epoll object, the keys
        _selector: select.epoll
        _fd_to_key: dict[int, selectors.SelectorKey]
        _fileobj_lookup: Callable[[FileDescriptorLike], int]

        def __init__(self) -> None:
            super().__init__()
            self._live: Waiting = {}
            self._ending: Waiting = {}
            self._unsorted: Waiting = {}  # readable and open, not served lately: not yet peeked
            # fds served in this period of HOT_FOR seconds and in the one before (no time per fd: a set
            # add per event served), and when this period ends
            self._served: set[int] = set()
            self._served_before: set[int] = set()
            self._period_ends = 0.0
            self._polled: dict[int, int] = {}  # fd -> the events it was polled with, while it waits (in any queue)
            # fds out of epoll's interest while they wait here (each poll returned every waiting socket
            # again, level-triggered, about 0.5 us each a round), and those taken since the last poll,
            # to be put back in at the next (unless asyncio has unregistered them meanwhile)
            self._out: set[int] = set()
            self._back: list[int] = []
            # fds left waiting by the last poll, taken out at the start of the next (after this round's
            # callbacks: a live socket found in a mass leave's first poll does not wait for these)
            self._leaving: list[int] = []

        @property
        def waiting(self) -> int:
            """Events polled and not yet returned."""
            return len(self._live) + len(self._ending) + len(self._unsorted)

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            started = time.thread_time() if self._unsorted else 0.0  # this round's CPU, for _sort
            if self._leaving:
                self._take_out()
            if self._back:
                self._put_back()
            backlog = bool(self._live or self._ending or self._unsorted)
            if timeout is None:
                wait = 0.0 if backlog else -1.0
            elif timeout <= 0 or backlog:
                wait = 0.0
            else:  # as EpollSelector: at least timeout, in whole milliseconds
                wait = math.ceil(timeout * 1e3) * 1e-3
            try:
                fd_events = self._selector.poll(wait, max(len(self._fd_to_key), 1))
            except InterruptedError:
                fd_events = []
            now = time.monotonic()
            if now >= self._period_ends:
                self._served_before, self._served = self._served, set()
                self._period_ends = now + self.HOT_FOR
            if not backlog and len(fd_events) <= self.BOUND:
                ready = []
                served = self._served
                for fd, event in fd_events:
                    key = self._fd_to_key.get(fd)
                    if key:
                        ready.append((key, _events(event) & key.events))
                        served.add(fd)
                return ready
            return self._slice(fd_events, started)

        def _slice(self, fd_events: list[tuple[int, int]], started: float) -> list[tuple[selectors.SelectorKey, int]]:
            live, ending, unsorted, polled = self._live, self._ending, self._unsorted, self._polled
            keys = self._fd_to_key
            served, served_before = self._served, self._served_before
            last = self.LAST_WORDS
            size, readable = len(last or b""), select.EPOLLIN if last else 0
            masks = _MASKS
            began = 0.0 if started else time.thread_time()  # a large poll's own round: its sort counts from here
            fresh = []
            for fd, event in fd_events:  # 8,000 of them in a mass leave's first poll: no call per event
                if fd in polled:
                    continue  # waiting already, in its place (one that could not be taken out of epoll)
                key = keys.get(fd)
                if key:
                    polled[fd] = masks.get(event) or _events(event)
                    fresh.append(fd)
                    if event & _ENDING:
                        ending[fd] = key
                    elif not event & readable:
                        live[fd] = key
                    elif fd in served or fd in served_before:
                        (ending if _peek(key, size) == last else live)[fd] = key
                    else:
                        unsorted[fd] = key
            if unsorted:
                self._sort(started or began)
            ready = self._take()
            self._leaving = [fd for fd in fresh if fd in polled]
            return ready

        def _sort(self, started: float) -> None:
            """Peek unsorted sockets, first polled first, each found closing or live now: at most ``PEEKS``,
            and once ``SORT_CPU`` seconds of CPU have been used since ``started``, no more than the batch
            under way (``SORT_BATCH``)."""
            unsorted, keys, out = self._unsorted, self._fd_to_key, self._out
            live, ending, polled = self._live, self._ending, self._polled
            last = self.LAST_WORDS
            assert last is not None  # no socket is left unsorted without last words to look for
            size, batch, until = len(last), self.SORT_BATCH, started + self.SORT_CPU
            for n, (fd, key) in enumerate(list(islice(unsorted.items(), self.PEEKS)), 1):
                del unsorted[fd]
                if keys.get(fd) is not key:  # unregistered, or its number reused, or modified since its poll
                    polled.pop(fd, None)  # its event is dropped: a later poll returns it if it holds
                    if fd in out:
                        self._back.append(fd)
                else:
                    (ending if _peek(key, size) == last else live)[fd] = key
                if not n % batch and time.thread_time() >= until:
                    return

        def _take_out(self) -> None:
            """The fds the last poll left waiting out of epoll's interest until taken (unless asyncio has
            unregistered them meanwhile)."""
            polled, out, poller = self._polled, self._out, self._selector
            for fd in self._leaving:
                if fd in polled:
                    try:
                        poller.unregister(fd)
                    except OSError:
                        continue  # stays in, returned by each poll again and skipped in _slice
                    out.add(fd)
            self._leaving = []

        def _take(self) -> list[tuple[selectors.SelectorKey, int]]:
            """At most ``BOUND`` waiting events, live ones first, each the first time it is taken; closing
            ones only once none is unsorted."""
            keys, out, polled, served = self._fd_to_key, self._out, self._polled, self._served
            ready = []
            room = self.BOUND
            for queue in (self._live, self._ending):
                if not room or not queue or (queue is self._ending and self._unsorted):
                    continue
                taken = list(islice(queue.items(), room))
                if len(taken) == len(queue):
                    queue.clear()
                else:
                    for fd, _ in taken:
                        del queue[fd]
                room -= len(taken)
                for fd, key in taken:
                    events = polled.pop(fd)
                    if fd in out:
                        self._back.append(fd)
                    if keys.get(fd) is key and events & key.events:  # the same registration, still asking
                        ready.append((key, events & key.events))
                        served.add(fd)
            return ready

        def _put_back(self) -> None:
            """The fds taken since the last poll back in epoll's interest, with their interest now (a
            socket still readable is returned by the next poll again: level-triggered)."""
            keys, out, poller = self._fd_to_key, self._out, self._selector
            for fd in self._back:
                key = keys.get(fd)
                if fd in out and key is not None:
                    out.discard(fd)
                    with contextlib.suppress(OSError):  # closed without unregistering: as the stdlib's
                        poller.register(fd, self._mask(key.events))
            self._back.clear()

        def _mask(self, events: int) -> int:
            return (self._EVENT_READ if events & selectors.EVENT_READ else 0) | (
                select.EPOLLOUT if events & selectors.EVENT_WRITE else 0
            )

        def modify(self, fileobj: FileDescriptorLike, events: int, data: Any = None) -> selectors.SelectorKey:
            fd = self._fileobj_lookup(fileobj)
            if fd not in self._out:
                return super().modify(fileobj, events, data)
            key = self._fd_to_key[fd]  # out of epoll: its interest is set when it is put back
            if events != key.events or data != key.data:
                key = key._replace(events=events, data=data)
                self._fd_to_key[fd] = key
            return key

        def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
            fd = self._fileobj_lookup(fileobj)
            if fd in self._out:  # not in epoll: only the bookkeeping
                key = selectors._BaseSelectorImpl.unregister(self, fileobj)
                self._out.discard(fd)
            else:
                key = super().unregister(fileobj)
            self._live.pop(key.fd, None)  # not needed for correctness (the key check), frees it early
            self._ending.pop(key.fd, None)
            self._unsorted.pop(key.fd, None)
            self._polled.pop(key.fd, None)
            return key

        def close(self) -> None:
            self._live.clear()
            self._ending.clear()
            self._unsorted.clear()
            self._polled.clear()
            self._out.clear()
            self._back.clear()
            self._leaving = []
            super().close()


def new_selector() -> selectors.BaseSelector:
    """``LiveFirstSelector`` where epoll is, else the platform's default selector."""
    if hasattr(select, "epoll"):
        return LiveFirstSelector()
    return selectors.DefaultSelector()
