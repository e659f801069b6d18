"""Turn user definitions (expression strings, params, gradients) into checked kernel programs.

An :class:`ExprSpec` holds the forward :class:`~kernforge.expr.program.Program` of an
elementwise or rowwise op and builds the backward program for any subset of inputs: from the
gradient expressions the user gave, else by symbolic differentiation.
"""

from __future__ import annotations

import hashlib
import keyword
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from .parse import ExpressionError, free_names, parse
from .program import DY, N, Program, Reduction, ReductionSet, backward, depends_on, prune
from .tree import Node, Var, mul, substitute

#: Name of the forward result inside gradient expressions.
OUT = "out"
#: Reduction kinds of ``rowwise(reduce=...)``.
REDUCE_KINDS = ("sum", "mean", "max", "min")

#: A parameter with no default must be passed on every call.
REQUIRED = None


@dataclass(frozen=True)
class ExprSpec:
    """A checked definition of one expression op (see the module docs)."""

    kind: str  # "elementwise" | "rowwise"
    name: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    defaults: tuple[tuple[str, float | None], ...]
    forward: Program
    grads: tuple[tuple[str, Program], ...]  # explicit gradient programs, by input
    definition: str  # a canonical description: the cache key of the op
    _bwd_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rowwise(self) -> bool:
        """True for rowwise ops (reductions along the last dimension)."""
        return self.kind == "rowwise"

    def backward_program(self, needs: tuple[bool, ...]) -> Program:
        """The program computing the gradients of the inputs flagged in ``needs`` (in input
        order): explicit gradients where given, derived ones otherwise."""
        cached = self._bwd_cache.get(needs)
        if cached is not None:
            return cached
        wanted = [x for x, need in zip(self.inputs, needs, strict=True) if need]
        explicit = dict(self.grads)
        derived = tuple(x for x in wanted if x not in explicit)
        parts: dict[str, tuple[Program, int]] = {}
        if derived:
            prog = backward(self.forward, derived)
            for i, x in enumerate(derived):
                parts[x] = (prog, i)
        for x in wanted:
            if x in explicit:
                parts[x] = (explicit[x], 0)
        merged = _merge([parts[x] for x in wanted], self.forward)
        self._bwd_cache[needs] = merged
        return merged


def _merge(parts: list[tuple[Program, int]], fwd: Program) -> Program:
    """One program computing output ``i`` of each ``(program, i)``; reductions of the same
    name are the same reduction (the forward ones), others are renamed apart."""
    reductions: list[Reduction] = []
    seen: dict[str, Reduction] = {}
    outputs: list[Node] = []
    operands: list[str] = []
    row_operands: list[str] = []
    renamed_programs: dict[int, dict[str, Node]] = {}
    for prog, i in parts:
        mapping = renamed_programs.get(id(prog))
        if mapping is None:
            mapping = {}
            for r in prog.reductions:
                expr = substitute(r.expr, mapping)
                name = r.name
                if name in seen and seen[name] != Reduction(name, r.kind, expr):
                    name = f"{r.name}@{len(seen)}"
                    mapping[r.name] = Var(name)
                if name not in seen:
                    seen[name] = Reduction(name, r.kind, expr)
                    reductions.append(seen[name])
            renamed_programs[id(prog)] = mapping
            operands += [x for x in prog.operands if x not in operands]
            row_operands += [x for x in prog.row_operands if x not in row_operands]
        outputs.append(substitute(prog.outputs[i], mapping))
    # Element operands in forward order, then dy: the kernels' argument order is stable.
    ordered = [x for x in fwd.operands if x in operands] + [x for x in operands
                                                           if x not in fwd.operands]  # fmt: skip
    merged = Program(tuple(ordered), tuple(row_operands), fwd.params, tuple(reductions),
                     tuple(outputs), row_outputs=False)  # fmt: skip
    return prune(merged)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ExpressionError(
            f"{what} name {name!r} is not usable: names must be identifiers and not Python "
            "keywords (they become keyword arguments of the op)"
        )


def _params(params: Mapping[str, float | None] | Sequence[str] | None) -> dict[str, float | None]:
    if params is None:
        return {}
    if isinstance(params, str):
        raise ExpressionError(
            f"params={params!r}: give a mapping of names to defaults ({{'eps': 1e-6}}) or a "
            "sequence of names"
        )
    if isinstance(params, Mapping):
        out: dict[str, float | None] = {}
        for k, v in params.items():
            _check_name(k, "parameter")
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ExpressionError(
                    f"parameter {k!r} has default {v!r}; defaults are numbers (or None: required)"
                )
            out[k] = None if v is None else float(v)
        return out
    out = {}
    for k in params:
        _check_name(k, "parameter")
        out[k] = REQUIRED
    return out


def _inputs(
    given: Sequence[str] | None, found: list[str], params: Mapping[str, object], reserved: set[str]
) -> tuple[str, ...]:
    if isinstance(given, str):
        given = [given]
    for x in found:
        if x in (DY, OUT):
            raise ExpressionError(
                f"{x!r} is reserved: inside gradient expressions it names "
                f"{'the output gradient' if x == DY else 'the forward value'}; forward "
                "expressions cannot use it. Rename that input."
            )
    if given is None:
        inputs = tuple(x for x in found if x not in params and x not in reserved)
    else:
        inputs = tuple(given)
        if len(set(inputs)) != len(inputs):
            raise ExpressionError(f"inputs={list(inputs)} names an input twice")
    for x in inputs:
        _check_name(x, "input")
        if x in reserved:
            raise ExpressionError(
                f"input name {x!r} is reserved here ({', '.join(sorted(reserved))}); rename it"
            )
        if x in params:
            raise ExpressionError(f"{x!r} is both an input and a parameter; rename one")
    for p in params:
        if p in reserved:
            raise ExpressionError(
                f"parameter name {p!r} is reserved here ({', '.join(sorted(reserved))})"
            )
    if not inputs:
        raise ExpressionError(
            "the expression uses no input tensor; name at least one input (or pass inputs=[...])"
        )
    return inputs


def _grad_dict(grad: Mapping[str, str] | None, inputs: tuple[str, ...]) -> dict[str, str]:
    if grad is None:
        return {}
    if not isinstance(grad, Mapping):
        raise ExpressionError(
            f"grad must map input names to gradient expressions, got {type(grad).__name__}"
        )
    for x in grad:
        if x not in inputs:
            raise ExpressionError(
                f"grad names {x!r}, which is not an input (inputs: {', '.join(inputs)})"
            )
    return dict(grad)


def _describe(kind: str, **parts: object) -> str:
    return f"{kind}:" + repr(sorted((k, repr(v)) for k, v in parts.items()))


def _default_name(kind: str, definition: str) -> str:
    return f"{kind}_{hashlib.sha1(definition.encode()).hexdigest()[:10]}"


def elementwise_spec(
    expr: str,
    inputs: Sequence[str] | None,
    params: Mapping[str, float | None] | Sequence[str] | None,
    grad: Mapping[str, str] | None,
    name: str | None,
) -> ExprSpec:
    """Check and compile an elementwise definition (see :func:`kernforge.elementwise`)."""
    pdefaults = _params(params)
    reserved = {DY, OUT}
    found = free_names(expr)
    ins = _inputs(inputs, found, pdefaults, reserved)
    known = set(ins) | set(pdefaults)
    tree = parse(expr, known, "expression")
    fwd = Program(ins, (), tuple(pdefaults), (), (tree,))
    grads = _grad_dict(grad, ins)
    programs: list[tuple[str, Program]] = []
    for x, text in grads.items():
        g = parse(text, known | {DY, OUT}, f"gradient of {x}")
        g = substitute(g, {OUT: tree})
        if not depends_on(g, DY):
            g = mul(Var(DY), g)  # a local derivative: chain it with dy
        prog = Program((*ins, DY), (), tuple(pdefaults), (), (g,), row_outputs=False)
        programs.append((x, prune(prog)))
    definition = _describe("elementwise", expr=expr, inputs=ins, params=pdefaults, grad=grads)
    name = name or _default_name("elementwise", definition)
    defaults = tuple(pdefaults.items())
    return ExprSpec("elementwise", name, ins, tuple(pdefaults), defaults, fwd, tuple(programs),
                    definition)  # fmt: skip


def _as_list(v: str | Sequence[str], what: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, Sequence) and v and all(isinstance(s, str) for s in v):
        return list(v)
    raise ExpressionError(f"{what} must be a string or a non-empty list of strings, got {v!r}")


def _acc_names(k: int) -> list[str]:
    return ["acc"] if k == 1 else [f"acc{i}" for i in range(k)]


def rowwise_spec(
    expr: str | None,
    map: str | Sequence[str] | None,  # noqa: A002 - the API's word
    reduce: str | Sequence[str],
    finalize: str,
    inputs: Sequence[str] | None,
    params: Mapping[str, float | None] | Sequence[str] | None,
    grad: Mapping[str, str] | None,
    name: str | None,
) -> ExprSpec:
    """Check and compile a rowwise definition (see :func:`kernforge.rowwise`)."""
    pdefaults = _params(params)
    if expr is not None and map is not None:
        raise ExpressionError("give either an expression or map=/reduce=/finalize=, not both")
    if expr is None and map is None:
        raise ExpressionError(
            "rowwise needs an expression using rowsum/rowmean/rowmax/rowmin, or map= (with "
            "reduce= and finalize=)"
        )
    if expr is not None:
        maps: list[str] = []
        kinds: list[str] = []
        final = expr
        accs: list[str] = []
    else:
        maps = _as_list(map, "map")  # type: ignore[arg-type]
        kinds = _as_list(reduce, "reduce")
        if len(kinds) == 1:
            kinds = kinds * len(maps)
        if len(kinds) != len(maps):
            raise ExpressionError(f"{len(maps)} map expressions but {len(kinds)} reduce kinds")
        for k in kinds:
            if k not in REDUCE_KINDS:
                raise ExpressionError(f"reduce={k!r}; use one of {', '.join(REDUCE_KINDS)}")
        if not isinstance(finalize, str):
            raise ExpressionError(f"finalize must be an expression string, got {finalize!r}")
        final = finalize
        accs = _acc_names(len(maps))
    reserved = {DY, OUT, N, *accs}
    found: list[str] = []
    for text in [*maps, final]:
        found += [x for x in free_names(text, rows=True) if x not in found]
    ins = _inputs(inputs, found, pdefaults, reserved)
    known = set(ins) | set(pdefaults) | {N}
    reds = ReductionSet()
    env: dict[str, Node] = {}
    for i, (text, kind) in enumerate(zip(maps, kinds, strict=True)):
        # Map i may use the accumulators before it.
        tree = parse(text, known | set(accs[:i]), f"map {i}" if len(maps) > 1 else "map", reds)
        env[accs[i]] = reds.add(kind, substitute(tree, env))
    tree = parse(final, known | set(accs), "finalize" if map is not None else "expression", reds)
    tree = substitute(tree, env)
    if not reds.items:
        raise ExpressionError(
            f"the rowwise expression {final!r} reduces nothing; use rowsum/rowmean/rowmax/rowmin "
            "(or kf.elementwise for a per-element op)"
        )
    params_all = (*pdefaults, N)
    fwd = Program(ins, (), params_all, tuple(reds.items), (tree,))
    grads = _grad_dict(grad, ins)
    programs: list[tuple[str, Program]] = []
    dy_row = fwd.output_per_row(0)
    for x, text in grads.items():
        greds = ReductionSet(items=list(reds.items))  # forward reductions keep their names
        g = parse(text, known | set(accs) | {DY, OUT}, f"gradient of {x}", greds)
        g = substitute(g, {**env, OUT: tree})
        extra = tuple(replace(r, expr=substitute(r.expr, {**env, OUT: tree})) for r in greds.items)
        if not depends_on(g, DY) and not any(depends_on(r.expr, DY) for r in extra):
            g = mul(Var(DY), g)
        ops_ = ins if dy_row else (*ins, DY)
        rows_ = (DY,) if dy_row else ()
        prog = Program(ops_, rows_, params_all, extra, (g,), row_outputs=False)
        programs.append((x, prune(prog)))
    definition = _describe("rowwise", expr=expr, map=maps, reduce=kinds, finalize=final,
                           inputs=ins, params=pdefaults, grad=grads)  # fmt: skip
    name = name or _default_name("rowwise", definition)
    return ExprSpec("rowwise", name, ins, tuple(pdefaults), tuple(pdefaults.items()), fwd,
                    tuple(programs), definition)  # fmt: skip
