"""Parse the ``extern "C" __global__`` kernel signatures of a CUDA C++ source.

NVRTC gives no reflection of a kernel's parameters, so :func:`parse_kernels` reads them from
the source text: enough C++ to find each ``__global__ void name(...)`` in an ``extern "C"``
region and to split its parameter list, with ``typedef``/``using`` aliases and simple
object-like ``#define``s (in the source or given as ``-DNAME=VALUE``) resolved, so that launch
arguments can be checked against the types before any kernel runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import CompileError


@dataclass(frozen=True)
class Param:
    """One kernel parameter: ``ctype`` is the base type with qualifiers and ``*`` removed."""

    name: str
    ctype: str
    is_pointer: bool
    is_const: bool

    def __str__(self) -> str:
        const = "const " if self.is_const else ""
        star = "*" if self.is_pointer else ""
        return f"{const}{self.ctype}{star} {self.name}"


_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_QUALIFIERS = {
    "const", "volatile", "__restrict__", "__restrict", "restrict", "struct", "class",
    "__grid_constant__", "register",
}  # fmt: skip
_ATTRIBUTE = re.compile(r"__launch_bounds__\s*\([^)]*\)|__cluster_dims__\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_]\w*")
# Spellings of the same type, mapped to one name so that checks need one table.
_CANONICAL = {
    "signed": "int", "signed int": "int", "int32_t": "int", "unsigned": "unsigned int",
    "uint32_t": "unsigned int", "long": "long long", "long int": "long long",
    "long long int": "long long", "signed long long": "long long", "int64_t": "long long",
    "ptrdiff_t": "long long", "intptr_t": "long long", "unsigned long": "unsigned long long",
    "unsigned long int": "unsigned long long", "unsigned long long int": "unsigned long long",
    "uint64_t": "unsigned long long", "size_t": "unsigned long long",
    "uintptr_t": "unsigned long long", "short int": "short", "signed short": "short",
    "int16_t": "short", "unsigned short int": "unsigned short", "uint16_t": "unsigned short",
    "signed char": "signed char", "int8_t": "signed char", "uint8_t": "unsigned char",
    "half": "__half", "nv_bfloat16": "__nv_bfloat16", "half2": "__half2",
    "nv_bfloat162": "__nv_bfloat162",
}  # fmt: skip


def strip_comments(source: str) -> str:
    """``source`` with comments replaced by blanks (newlines kept, so line numbers hold)."""

    def blank(m: re.Match[str]) -> str:
        text = m.group(0)
        if text.startswith('"'):
            return text
        return re.sub(r"[^\n]", " ", text)

    return re.sub(r'"(?:\\.|[^"\\\n])*"|//[^\n]*|/\*.*?\*/', blank, source, flags=re.S)


def _aliases(code: str, defines: Mapping[str, str]) -> dict[str, str]:
    out = {k: v for k, v in defines.items() if v}
    for m in re.finditer(r"^\s*#\s*define\s+([A-Za-z_]\w*)[ \t]+([^\n\\]+)$", code, re.M):
        out.setdefault(m.group(1), m.group(2).strip())
    for m in re.finditer(r"\btypedef\s+([^;{}()]+?)\s+([A-Za-z_]\w*)\s*;", code):
        out[m.group(2)] = m.group(1)
    for m in re.finditer(r"\busing\s+([A-Za-z_]\w*)\s*=\s*([^;{}()]+?)\s*;", code):
        out[m.group(1)] = m.group(2)
    return out


def _resolve(tokens: list[str], aliases: Mapping[str, str], depth: int = 0) -> list[str]:
    if depth > 8:
        return tokens
    out: list[str] = []
    for tok in tokens:
        if tok in aliases:
            sub = re.findall(r"[A-Za-z_][\w:]*|\*|&", aliases[tok])
            out.extend(_resolve(sub, aliases, depth + 1))
        else:
            out.append(tok)
    return out


def parse_param(text: str, aliases: Mapping[str, str] | None = None) -> Param:
    """Parse one parameter declaration such as ``const float* __restrict__ x``."""
    text = _ATTRIBUTE.sub(" ", text).strip()
    array = text.endswith("]")
    text = re.sub(r"\[[^\]]*\]\s*$", "", text).strip()
    tokens = re.findall(r"[A-Za-z_][\w:]*|\*|&|<[^>]*>", text)
    if not tokens:
        raise CompileError(f"cannot parse kernel parameter {text!r}")
    name = tokens[-1]
    if not _IDENT.fullmatch(name) or len(tokens) < 2:
        raise CompileError(
            f"kernel parameter {text!r} has no name; kernforge needs named parameters to "
            "check launch arguments"
        )
    base = _resolve(tokens[:-1], aliases or {})
    stars = base.count("*") + (1 if array else 0)
    if "&" in base:
        raise CompileError(f"kernel parameter {text!r} is a reference; kernels take values")
    is_const = False
    words = []
    seen_star = False
    for tok in base:
        if tok == "*":
            seen_star = True
        elif tok == "const":
            # const after the last '*' qualifies the pointer itself, not the pointee.
            is_const = is_const or not seen_star
        elif tok not in _QUALIFIERS:
            words.append(tok.removeprefix("::"))
    ctype = " ".join(words)
    ctype = _CANONICAL.get(ctype, ctype)
    if stars > 1:
        ctype += " " + "*" * (stars - 1)  # pointer to pointer: pointee is itself a pointer
    return Param(name=name, ctype=ctype, is_pointer=stars > 0, is_const=is_const)


def _split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    parts = [p.strip() for p in parts]
    if parts == [""] or parts == ["void"]:
        return []
    return parts


def _extern_c_spans(code: str) -> list[tuple[int, int]]:
    """Character ranges of the source that have C linkage."""
    spans = []
    for m in re.finditer(r'extern\s+"C"\s*(\{)?', code):
        start = m.end()
        if m.group(1):
            depth, i = 1, start
            while i < len(code) and depth:
                depth += {"{": 1, "}": -1}.get(code[i], 0)
                i += 1
            spans.append((start, i))
        else:
            end = code.find(";", start)
            brace = code.find("{", start)
            spans.append((start, max(end, brace) if min(end, brace) < 0 else min(end, brace)))
    return spans


def parse_kernels(
    source: str,
    defines: Iterable[str] | Mapping[str, str] = (),
    headers: Iterable[str] = (),
) -> dict[str, list[Param]]:
    """Every ``extern "C" __global__`` kernel of ``source``: name -> parameters.

    ``defines`` are the ``-D`` options of the compile (``"NAME=VALUE"`` strings or a mapping)
    and ``headers`` the texts of in-memory headers, both used to resolve parameter types
    spelled with macros or aliases.
    """
    if not isinstance(defines, Mapping):
        defines = dict(
            (d.split("=", 1) + [""])[:2]
            for d in defines  # type: ignore[misc]
        )
    code = strip_comments(source)
    # Blank out attributes (same length, so offsets hold): their parentheses would end the
    # declaration head early.
    code = _ATTRIBUTE.sub(lambda m: " " * len(m.group(0)), code)
    aliases = _aliases("\n".join([*(strip_comments(h) for h in headers), code]), defines)
    spans = _extern_c_spans(code)
    kernels: dict[str, list[Param]] = {}
    pattern = re.compile(r"__global__\b(?P<head>[^;{}()]*?)\b(?P<name>[A-Za-z_]\w*)\s*\(")
    for m in pattern.finditer(code):
        if "void" not in m.group("head").split():
            continue
        if not any(a <= m.start() < b for a, b in spans):
            continue
        # Find the matching ')' of the parameter list.
        depth, i = 1, m.end()
        while i < len(code) and depth:
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        params_text = code[m.end() : i - 1]
        name = m.group("name")
        kernels[name] = [parse_param(p, aliases) for p in _split_params(params_text)]
    return kernels
