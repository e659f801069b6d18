"""Shared code emission: each distinct subtree becomes one temporary (CSE), in scopes.

A backend supplies how to spell an operation, a constant and an assignment; the emitter walks
a tree children first and gives every operation a temporary once. Scopes model loops (the
CUDA row kernel's loops over a row): a value goes to the scope its :attr:`Emitter.level` says,
so per-row values are computed once per row, outside the per-element loops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .tree import Node, Num, Op, Var, is_bool, walk


@dataclass
class Scope:
    """Lines emitted at one nesting level, and the values they define."""

    lines: list[str] = field(default_factory=list)
    memo: dict[Node, str] = field(default_factory=dict)


class Emitter:
    """Emit trees as straight-line code (see the module docs)."""

    def __init__(
        self,
        names: dict[str, str],
        spell: Callable[[Op, list[str]], str],
        number: Callable[[float], str],
        assign: Callable[[str, str, bool], str],
        level: Callable[[Node], int] = lambda n: 0,
    ) -> None:
        self.names = names  # variable name -> code
        self.spell = spell
        self.number = number
        self.assign = assign  # (temporary, expression, is_bool) -> one line
        self.level = level
        self.scopes: list[Scope] = [Scope()]
        self.count = 0

    def push(self) -> None:
        """Open an inner scope (a loop body)."""
        self.scopes.append(Scope())

    def pop(self) -> list[str]:
        """Close the innermost scope; returns its lines."""
        return self.scopes.pop().lines

    def take(self, depth: int) -> list[str]:
        """The lines emitted so far at scope ``depth`` (which stays open, emptied)."""
        lines = self.scopes[depth].lines
        self.scopes[depth].lines = []
        return lines

    def bind(self, name: str, code: str) -> None:
        """Make variable ``name`` spell as ``code`` from now on (e.g. a reduction's result)."""
        self.names[name] = code

    def _lookup(self, n: Node) -> str | None:
        for scope in self.scopes:
            if n in scope.memo:
                return scope.memo[n]
        return None

    def value(self, node: Node) -> str:
        """The code of ``node``'s value, emitting the lines it needs."""
        for n in walk(node):
            if self._lookup(n) is not None:
                continue
            if isinstance(n, Num):
                code = self.number(n.value)
            elif isinstance(n, Var):
                if n.name not in self.names:
                    raise KeyError(f"code generation: no binding for variable {n.name!r}")
                code = self.names[n.name]
            else:
                assert isinstance(n, Op)
                args = [self._lookup(a) for a in n.args]
                expr = self.spell(n, args)  # type: ignore[arg-type]
                code = f"t{self.count}"
                self.count += 1
                depth = min(self.level(n), len(self.scopes) - 1)
                self.scopes[depth].lines.append(self.assign(code, expr, is_bool(n)))
                self.scopes[depth].memo[n] = code
                continue
            self.scopes[0].memo[n] = code
        code = self._lookup(node)
        assert code is not None
        return code
