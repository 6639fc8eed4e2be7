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
from services.coordinator.engine.drafters import Proposal

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


class _Tree:
    """A token tree being built: identical children of one node collapse."""

    def __init__(self, budget: int) -> None:
        self.nodes: list[DraftToken] = []
        self._child: dict[tuple[int, int], int] = {}
        self._budget = budget

    def add(self, parent: int, tokens: Sequence[int]) -> list[int]:
        """Add ``tokens`` as a path under ``parent`` (reusing equal nodes);
        returns the node indices, fewer when the budget runs out."""
        out = []
        for tok in tokens:
            node = self._child.get((parent, tok))
            if node is None:
                if len(self.nodes) >= self._budget:
                    break
                node = len(self.nodes)
                self.nodes.append(DraftToken(tok, parent))
                self._child[(parent, tok)] = node
            out.append(node)
            parent = node
        return out


def verification_tree(
    main: Sequence[DraftToken],
    alternatives: Alternatives,
    base: int,
    budget: int,
    proposals: Sequence[Proposal] = (),
    context: Sequence[int] = (),
) -> tuple[list[DraftToken], int]:
    """The tree a verification at ``base`` (after ``context``) carries, within
    ``budget`` nodes: the main-path drafts ``main`` (positions ``base ..``)
    as a chain first; then the primary's alternatives at those positions with
    their branches; then every other drafter's proposal that agrees with
    ``context``, from ``base`` on, attached where it starts (collapsing into
    the main path as long as it agrees with it). Returns the nodes and how
    many main drafts they include."""
    tree = _Tree(budget)
    main_nodes = tree.add(ROOT, [d.token_id for d in main])
    n_main = len(main_nodes)

    def parent_of(position: int) -> int:  # the main node before ``position``
        return ROOT if position == base else main_nodes[position - base - 1]

    for i in range(n_main):
        for branch in alternatives.at.get(base + i, []):
            tree.add(parent_of(base + i), branch)
    for proposal in proposals:
        if proposal.dead or proposal.start > base + n_main:
            continue  # wrong already, or it assumes drafts this verification does not carry
        skip = base - proposal.start
        if skip > 0 and list(context[proposal.start : base]) != proposal.tokens[:skip]:
            continue  # it assumed other tokens before ``base``
        attach = max(proposal.start, base)
        tree.add(parent_of(attach), proposal.tokens[max(skip, 0) :])
    return tree.nodes, n_main
