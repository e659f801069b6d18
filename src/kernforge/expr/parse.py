"""Parse C-like expressions into trees.

Grammar, loosest binding first (as in C)::

    expr     := or ('?' expr ':' expr)?          c ? a : b
    or       := and ('||' and)*
    and      := equality ('&&' equality)*
    equality := relation (('==' | '!=') relation)*
    relation := sum (('<' | '<=' | '>' | '>=') sum)*
    sum      := product (('+' | '-') product)*
    product  := unary (('*' | '/') unary)*
    unary    := ('-' | '+' | '!') unary | primary
    primary  := NUMBER | NAME | NAME '(' expr (',' expr)* ')' | '(' expr ')'

Numbers are floats (``2``, ``0.5``, ``.5``, ``1e-6``, ``1.0f``); ``1 / 2`` is 0.5. Names are
inputs, scalar parameters or the constants ``pi`` and ``inf``. ``where(c, a, b)`` is the
ternary as a call. Functions are those of :mod:`kernforge.expr.snippets`.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ArgumentError
from .snippets import CONSTANTS, FUNCTIONS, MACROS
from .tree import Node, Num, Var, as_bool, as_float, op, substitute, where

if TYPE_CHECKING:
    from .program import ReductionSet

#: Row reductions (rowwise expressions only), by function name.
ROW_REDUCTIONS = {"rowsum": "sum", "rowmean": "mean", "rowmax": "max", "rowmin": "min"}


class ExpressionError(ArgumentError):
    """An expression does not parse, or names an unknown function or variable."""


@dataclass(frozen=True)
class Token:
    kind: str  # "num" | "name" | "op" | "end"
    text: str
    pos: int  # 0-based offset in the source


_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[fF]?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|&&|\|\||[-+*/()<>!?:,]))"
)


def _error(text: str, pos: int, message: str, hint: str = "", what: str = "expression"):
    caret = " " * pos + "^"
    extra = f"\n{hint}" if hint else ""
    return ExpressionError(f"bad {what} at column {pos + 1}: {message}\n  {text}\n  {caret}{extra}")


def tokenize(text: str, what: str = "expression") -> list[Token]:
    """Split ``text`` into tokens; an unexpected character raises :class:`ExpressionError`."""
    tokens: list[Token] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup is None:
            ch = text[pos]
            hint = ""
            if ch == "%":
                hint = "there is no % operator; write a - b * floor(a / b)"
            elif ch == "^":
                hint = "^ is not a power here; write pow(a, b)"
            elif ch in "&|=":
                hint = "logical operators are && and ||; comparison is =="
            raise _error(text, pos, f"unexpected character {ch!r}", hint, what)
        kind = m.lastgroup
        start = m.start(kind)
        tokens.append(Token(kind, m.group(kind), start))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


_BINARY = [
    {"||": "or"},
    {"&&": "and"},
    {"==": "eq", "!=": "ne"},
    {"<": "lt", "<=": "le", ">": "gt", ">=": "ge"},
    {"+": "add", "-": "sub"},
    {"*": "mul", "/": "div"},
]
_LOGICAL = ("or", "and")


def _known_functions(rows: bool = False) -> list[str]:
    return sorted([*FUNCTIONS, *MACROS, "where", *(ROW_REDUCTIONS if rows else ())])


class _Parser:
    def __init__(
        self,
        text: str,
        variables: Collection[str] | None,
        what: str,
        reductions: ReductionSet | None = None,
    ) -> None:
        self.reductions = reductions
        self.text = text
        self.what = what
        self.tokens = tokenize(text, what)
        self.i = 0
        self.variables = variables

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def error(self, tok: Token, message: str, hint: str = "") -> ExpressionError:
        return _error(self.text, tok.pos, message, hint, self.what)

    def describe(self, tok: Token) -> str:
        return "the end of the expression" if tok.kind == "end" else f"{tok.text!r}"

    def expect(self, text: str, context: str) -> Token:
        tok = self.tok
        if tok.text != text or tok.kind != "op":
            raise self.error(tok, f"expected {text!r} {context}, found {self.describe(tok)}")
        self.i += 1
        return tok

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self.error(self.tok, "the expression is empty")
        node = self.ternary()
        if self.tok.kind != "end":
            tok = self.tok
            hint = "missing an operator between two operands?" if tok.kind != "op" else ""
            raise self.error(tok, f"unexpected {self.describe(tok)} after a complete expression",
                             hint)  # fmt: skip
        return node

    def ternary(self) -> Node:
        cond = self.binary(0)
        if self.tok.kind == "op" and self.tok.text == "?":
            self.i += 1
            a = self.ternary()
            self.expect(":", "in the conditional 'c ? a : b'")
            b = self.ternary()
            return where(as_bool(cond), as_float(a), as_float(b))
        return cond

    def binary(self, level: int) -> Node:
        if level == len(_BINARY):
            return self.unary()
        ops = _BINARY[level]
        left = self.binary(level + 1)
        while self.tok.kind == "op" and self.tok.text in ops:
            name = ops[self.tok.text]
            self.i += 1
            right = self.binary(level + 1)
            if name in _LOGICAL:
                left = op(name, as_bool(left), as_bool(right))
            else:
                left = op(name, as_float(left), as_float(right))
        return left

    def unary(self) -> Node:
        tok = self.tok
        if tok.kind == "op" and tok.text in ("-", "+", "!"):
            self.i += 1
            operand = self.unary()
            if tok.text == "-":
                return op("neg", as_float(operand))
            if tok.text == "!":
                return op("not", as_bool(operand))
            return operand
        return self.primary()

    def primary(self) -> Node:
        tok = self.tok
        if tok.kind == "num":
            self.i += 1
            return Num(float(tok.text.rstrip("fF")))
        if tok.kind == "name":
            self.i += 1
            if self.tok.kind == "op" and self.tok.text == "(":
                return self.call(tok)
            return self.name(tok)
        if tok.kind == "op" and tok.text == "(":
            self.i += 1
            if self.tok.kind == "op" and self.tok.text == ")":
                raise self.error(self.tok, "empty parentheses")
            node = self.ternary()
            self.expect(")", f"to close the '(' at column {tok.pos + 1}")
            return node
        raise self.error(
            tok, f"expected an operand (a number, a name or '('), found {self.describe(tok)}"
        )

    def name(self, tok: Token) -> Node:
        name = tok.text
        if self.variables is not None and name in self.variables:
            return Var(name)
        if name in CONSTANTS:
            return Num(CONSTANTS[name])
        if name in FUNCTIONS or name in MACROS or name == "where" or name in ROW_REDUCTIONS:
            raise self.error(tok, f"{name!r} is a function; call it as {name}(...)")
        if self.variables is None:
            return Var(name)
        known = sorted(self.variables)
        close = difflib.get_close_matches(name, [*known, *CONSTANTS], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise self.error(
            tok, f"unknown variable {name!r}",
            f"{hint}known names: {', '.join(known) or '(none)'}, and the constants "
            f"{', '.join(CONSTANTS)}",
        )  # fmt: skip

    def call(self, tok: Token) -> Node:
        name = tok.text
        self.expect("(", "")
        args: list[Node] = []
        if not (self.tok.kind == "op" and self.tok.text == ")"):
            args.append(self.ternary())
            while self.tok.kind == "op" and self.tok.text == ",":
                self.i += 1
                args.append(self.ternary())
        self.expect(")", f"to close the call of {name!r} (or ',' between arguments)")
        if name == "where":
            self.arity(tok, name, 3, len(args))
            return where(as_bool(args[0]), as_float(args[1]), as_float(args[2]))
        if name in FUNCTIONS:
            self.arity(tok, name, FUNCTIONS[name].arity, len(args))
            return op(name, *(as_float(a) for a in args))
        if name in ROW_REDUCTIONS:
            if self.reductions is None:
                raise self.error(
                    tok, f"{name}() reduces along a row; it is only available in rowwise "
                    "expressions (kf.rowwise)",
                )  # fmt: skip
            self.arity(tok, name, 1, len(args))
            return self.reductions.add(ROW_REDUCTIONS[name], as_float(args[0]))
        if name in MACROS:
            macro = MACROS[name]
            self.arity(tok, name, len(macro.params), len(args))
            body = _macro_body(name)
            return substitute(body, dict(zip(macro.params, map(as_float, args), strict=True)))
        known = _known_functions(self.reductions is not None)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise self.error(
            tok, f"unknown function {name!r}",
            f"{hint}available: {', '.join(known)}",
        )  # fmt: skip

    def arity(self, tok: Token, name: str, want: int, got: int) -> None:
        if want != got:
            raise self.error(
                tok, f"{name}() takes {want} argument{'s' if want != 1 else ''}, got {got}"
            )


@functools.cache
def _macro_body(name: str) -> Node:
    macro = MACROS[name]
    return _Parser(macro.body, set(macro.params), f"snippet {name}").parse()


def parse(
    text: str,
    variables: Collection[str] | None = None,
    what: str = "expression",
    reductions: ReductionSet | None = None,
) -> Node:
    """Parse ``text`` into a simplified tree.

    With ``variables``, a name outside them (and the constants) raises
    :class:`ExpressionError`; without, every free name becomes a :class:`Var`. ``what`` names
    the expression in error messages (e.g. ``"gradient of x"``). With ``reductions``, the row
    reductions ``rowsum``/``rowmean``/``rowmax``/``rowmin`` are allowed: each is recorded there
    and stands in the tree as the variable that holds it.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"an {what} must be a string, got {type(text).__name__}")
    return as_float(_Parser(text, variables, what, reductions).parse())


def free_names(text: str, rows: bool = False) -> list[str]:
    """The variable names ``text`` uses, in order of first appearance (``rows``: allow row
    reductions). Raises :class:`ExpressionError` if ``text`` does not parse."""
    from .program import ReductionSet

    parser = _Parser(text, None, "expression", ReductionSet() if rows else None)
    parser.parse()
    toks = parser.tokens
    out: list[str] = []
    for tok, nxt in zip(toks, toks[1:], strict=False):
        is_var = tok.kind == "name" and nxt.text != "(" and tok.text not in CONSTANTS
        if is_var and tok.text not in out:
            out.append(tok.text)
    return out
