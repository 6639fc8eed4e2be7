"""Context prefixes: send a target only the tokens its session does not hold.

A target session remembers the last sequence it received (the request's
context, then its drafts when they were a chain). The next request of the
session may name a prefix of it by length and hash and carry only the tokens
after it; the target checks the hash and answers FAILED_PRECONDITION when it
does not hold that prefix (evicted session, restarted replica, a request the
client never saw the answer to), and the client then resends everything.

The hash is the first 8 bytes (little endian) of BLAKE2b-64 over the tokens
as little-endian uint32s. Both sides keep the hash state at every 256-token
boundary of the sequence they hold (:class:`HashedSequence`; BLAKE2b fed in
pieces equals BLAKE2b of the whole), so naming or checking a prefix costs
at most 256 tokens of hashing, whatever the context's length.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from dsi.domain.errors import FailedPrecondition


def _bytes(tokens: Sequence[int]) -> bytes:
    data = array("I", tokens)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def prefix_hash(tokens: Sequence[int]) -> int:
    """The hash a VerifyRequest names a context prefix by."""
    return int.from_bytes(hashlib.blake2b(_bytes(tokens), digest_size=8).digest(), "little")


class HashedSequence:
    """A token sequence with the hash state at every ``BLOCK``-token boundary,
    so that :meth:`prefix_hash` of any prefix hashes fewer than ``BLOCK`` tokens."""

    BLOCK = 256

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._states = [hashlib.blake2b(digest_size=8)]  # [k]: after the first k * BLOCK tokens

    def replace(self, tokens: list[int], common: int) -> None:
        """Hold ``tokens`` instead, whose first ``common`` tokens are the
        same as the ones held (hashing only what follows the last boundary
        before them)."""
        b = self.BLOCK
        del self._states[min(common, len(self.tokens)) // b + 1 :]
        h = self._states[-1].copy()
        for k in range(len(self._states) - 1, len(tokens) // b):
            h.update(_bytes(tokens[k * b : (k + 1) * b]))
            self._states.append(h.copy())
        self.tokens = tokens

    def prefix_hash(self, n: int) -> int:
        """:func:`prefix_hash` of the first ``n`` tokens held."""
        k = n // self.BLOCK
        h = self._states[k].copy()
        h.update(_bytes(self.tokens[k * self.BLOCK : n]))
        return int.from_bytes(h.digest(), "little")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (slice comparisons, in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def not_held(length: int) -> FailedPrecondition:
    """The error for a request naming a prefix of ``length`` tokens its session does not hold."""
    return FailedPrecondition(
        f"this session does not hold the context prefix the request names ({length} tokens): send the full context"
    )


def resolve(received: HashedSequence, length: int, digest: int, suffix: Sequence[int]) -> list[int]:
    """The full context a request names: the first ``length`` tokens
    received + ``suffix``, after checking the prefix's hash."""
    if length > len(received.tokens) or received.prefix_hash(length) != digest:
        raise not_held(length)
    return [*received.tokens[:length], *suffix]


class SentSequences:
    """A client's record of the last sequence it sent each session on one
    target (bounded: least recently used sessions are forgotten, which only
    means their next request carries the full context)."""

    MIN_PREFIX = 32  # shorter prefixes are not worth the hash

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._sent: OrderedDict[str, HashedSequence] = OrderedDict()
        self._in_flight: dict[str, list[list[int]]] = {}

    def split(self, session_id: str, context: Sequence[int]) -> tuple[int, int, Sequence[int]]:
        """(prefix length, prefix hash, tokens after it) to send for ``context``;
        (0, 0, context) when no long enough prefix is known. The prefix is
        also shared by every request of the session still in flight, so it
        holds whichever of them the target takes first."""
        sent = self._sent.get(session_id)
        if sent is None:
            return 0, 0, context
        n = common_prefix(sent.tokens, context)
        for other in self._in_flight.get(session_id, ()):
            n = min(n, common_prefix(other, context))
        if n < self.MIN_PREFIX:
            return 0, 0, context
        return n, sent.prefix_hash(n), context[n:]

    def sending(self, session_id: str, sequence: list[int]) -> None:
        """A request whose sequence (context, then chain drafts) is on its way."""
        self._in_flight.setdefault(session_id, []).append(sequence)

    def done(self, session_id: str, sequence: list[int], succeeded: bool) -> None:
        """The request of :meth:`sending` ended; a success is what the session holds now."""
        flying = self._in_flight.get(session_id, [])
        for i, other in enumerate(flying):
            if other is sequence:
                del flying[i]
                break
        if not flying:
            self._in_flight.pop(session_id, None)
        if succeeded:
            self.record(session_id, sequence)

    def record(self, session_id: str, sequence: list[int]) -> None:
        """What the session received with a request that succeeded."""
        held = self._sent.get(session_id)
        if held is None:
            held = self._sent[session_id] = HashedSequence()
        held.replace(sequence, common_prefix(held.tokens, sequence))
        self._sent.move_to_end(session_id)
        while len(self._sent) > self.capacity:
            self._sent.popitem(last=False)

    def forget(self, session_id: str) -> None:
        self._sent.pop(session_id, None)
