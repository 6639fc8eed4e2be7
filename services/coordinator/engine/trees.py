"""Token trees in the engine: reading a drafter's tree stream, and building
the tree a verification carries.

A drafter streams its *main path* (its best guesses) and, after each main
token, that position's *alternatives* (its next best guesses for the same
position, children of the same parent) with their *branches* (guesses that
follow an alternative). The engine keeps the main path as the pending drafts
and the alternatives by position (:class:`Alternatives`); a verification
carries a stretch of the main path plus the alternatives at its positions, as
one tree. When the target's token at a position is an alternative, its branch
becomes the pending drafts at once: the drafter loses no round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dsi.domain.types import ROOT, DraftToken

#: An alternative and the guesses that follow it: token ids, from its position on.
Branch = list[int]


@dataclass
class Alternatives:
    """Alternative branches by absolute position: ``at[p]`` are the drafter's
    next best guesses for position ``p`` (after the main path up to ``p``),
    in order of preference."""

    at: dict[int, list[Branch]] = field(default_factory=dict)

    def add(self, position: int, branch: Branch) -> None:
        self.at.setdefault(position, []).append(branch)

    def take(self, position: int, token: int) -> Branch | None:
        """The branch starting with ``token`` at ``position``, if any; the
        alternatives at ``position`` are used up either way."""
        for branch in self.at.pop(position, []):
            if branch[0] == token:
                return branch
        return None

    def clear(self) -> None:
        self.at.clear()

    def __len__(self) -> int:
        return sum(len(b) for b in self.at.values())


@dataclass
class _Node:
    position: int
    main: bool
    branch: Branch | None = None  # the branch an alternative or branch node belongs to


class StreamTree:
    """Reads the nodes of one Draft stream: which are main-path tokens and
    which are alternatives (and branch continuations), at which positions.

    A node whose parent is the last main node (or the root, for the first)
    continues the main path; a later child of the same parent is an
    alternative; a child of an alternative or branch node extends its branch.
    In a chain stream every node continues the main path."""

    def __init__(self, start: int) -> None:
        self.start = start  # the position of the stream's first main token
        self._nodes: list[_Node] = []
        self._last_main = ROOT

    def read(self, tokens: Sequence[DraftToken]) -> Iterator[tuple[int, int, Branch | None]]:
        """For each node: (position, token, None) for a main-path token, or
        (position, token, branch) for an alternative or a branch token, the
        branch being the list the token was appended to."""
        for tok in tokens:
            index = len(self._nodes)
            parent = index - 1 if tok.parent is None else tok.parent
            if not ROOT <= parent < index:
                raise ValueError(f"draft stream node {index} names parent {parent}")
            position = self.start if parent == ROOT else self._nodes[parent].position + 1
            if parent == self._last_main:  # the main path goes on
                self._nodes.append(_Node(position, main=True))
                self._last_main = index
                yield position, tok.token_id, None
                continue
            if parent == ROOT or self._nodes[parent].main:  # an alternative: a later child of a main node
                branch: Branch = [tok.token_id]
            else:  # a guess after an alternative or a branch token
                branch = self._nodes[parent].branch  # type: ignore[assignment]
                branch.append(tok.token_id)
            self._nodes.append(_Node(position, main=False, branch=branch))
            yield position, tok.token_id, branch


def verification_tree(
    main: Sequence[DraftToken], alternatives: Alternatives, base: int, budget: int
) -> tuple[list[DraftToken], int]:
    """The tree a verification at ``base`` carries: the main-path drafts
    ``main`` (for positions ``base ..``) as a chain, and after each of them
    the alternatives at its position with their branches, within ``budget``
    nodes (main drafts first, then alternatives in order of position and
    preference). Returns the nodes and how many main drafts they include."""
    n_main = min(len(main), budget)
    room = budget - n_main
    nodes: list[DraftToken] = []
    parent = ROOT
    for i in range(n_main):
        nodes.append(DraftToken(main[i].token_id, parent))
        main_index = len(nodes) - 1
        for branch in alternatives.at.get(base + i, []):
            take = branch[:room]
            for j, tok in enumerate(take):
                nodes.append(DraftToken(tok, parent if j == 0 else len(nodes) - 1))
            room -= len(take)
        parent = main_index
    return nodes, n_main
