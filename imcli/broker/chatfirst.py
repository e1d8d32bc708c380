"""Whether chat waits for the broker's loop while a file's chunk is in hand (issue 16).

A file's chunk takes the loop a few hundred microseconds in one callback: its copy out of the
reader's buffer, its checks, its fan-out and the write of its 256 KiB to the files worker or
to the receiver (a ``send`` that, on loopback, also does the receiving side's TCP work). A chat
message that arrives meanwhile waits for all of it. ``ChatFirst`` looks, before a chunk's copy
is written (``fanout.Deliveries.flush``), whether a socket other than a file transfer's is
readable now, i.e. whether chat (or anything that is not a transfer's next chunk) is waiting:
if so, the copy's write waits until the loop has read and handled it (``Deliveries``
holds it for a timer and one more round, as the reader's ``BULK`` rule holds a chunk's handling).

The look is ``epoll_wait`` with no timeout on the loop's own epoll (level-triggered: nothing is
taken from it, the loop's next ``select`` sees the same sockets), a system call of a few
microseconds per chunk written. The sockets of connections that have sent a chunk
(``mark_bulk``, by the reader) or been sent one (by ``Deliveries``) do not count: during a
transfer theirs is nearly always readable (the next chunk, or the PUBACK of the last one). A
chunk is a packet on a file's topic (``ImBroker.carries_file_bytes``), not any packet as big: a
``who`` reply for thousands of users, or a long DM, leaves its connection's chat counted. A
descriptor is forgotten when its connection's reader ends (``forget``): a new connection may
get its number (a transfer's copy written to a connection already ending could mark the number
again: the next connection to get it would then hold no chunk for its chat, a lost chance, not
a lost message). Only on asyncio's own selector loop with epoll (``imcli serve``'s default on
Linux); elsewhere (uvloop, another selector) nothing is ever held.
"""

from __future__ import annotations

import asyncio
import select
import weakref
from typing import Any

MAX_EVENTS = 64  # sockets looked at per look: more readable at once than this is a busy loop anyway

_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ChatFirst] = weakref.WeakKeyDictionary()


class ChatFirst:
    """One event loop's look at its readable sockets; ``bulk``: the file descriptors of connections
    that have sent or been sent a file's chunk (``mark_bulk``, ``forget``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        epoll = getattr(getattr(loop, "_selector", None), "_selector", None)  # asyncio private: read only
        self._poll = epoll.poll if isinstance(epoll, select.epoll) else None
        wakeup = getattr(loop, "_ssock", None)  # the loop's self-pipe (call_soon_threadsafe): not chat
        self._ignored = {wakeup.fileno()} if wakeup is not None else set()
        self.bulk: set[int] = set()
        self.looks = 0  # for the benchmarks: looks made, and how many found chat waiting
        self.held = 0

    def mark_bulk(self, transport: Any) -> None:
        """``transport``'s connection sent or is sent a file's chunk: a transfer's."""
        fd = fileno(transport)
        if fd is not None:
            self.bulk.add(fd)

    def forget(self, fd: int | None) -> None:
        """The connection of ``fd`` ended (its number may be a new connection's next)."""
        if fd is not None:
            self.bulk.discard(fd)

    def chat_waiting(self) -> bool:
        """Whether a socket of a connection that has sent no chunk (or a listening socket) is
        readable now."""
        poll = self._poll
        if poll is None:
            return False
        self.looks += 1
        bulk, ignored = self.bulk, self._ignored
        for fd, events in poll(0, MAX_EVENTS):
            if events & select.EPOLLIN and fd not in bulk and fd not in ignored:
                self.held += 1
                return True
        return False


def for_loop(loop: asyncio.AbstractEventLoop) -> ChatFirst:
    """The loop's ``ChatFirst`` (one per loop, made on first use)."""
    found = _BY_LOOP.get(loop)
    if found is None:
        found = _BY_LOOP[loop] = ChatFirst(loop)
    return found


def fileno(transport: Any) -> int | None:
    """``transport``'s socket's descriptor, if it has one still."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    try:
        fd = sock.fileno() if sock is not None else -1
    except (OSError, ValueError):
        return None
    return fd if fd >= 0 else None
