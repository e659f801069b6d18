"""The executor runs in its planned activation arena: every stored intermediate a step reads or
writes is a view of the one arena tensor at the offset the buffer plan gave it; a poisoned
arena changes nothing; a plan that puts two live values on the same bytes breaks the outputs
(so these tests can fail); the arena is smaller than storing every value apart."""

from __future__ import annotations

import pytest
import torch

from kernforge.compiler import compile_model
from kernforge.errors import ArgumentError
from kernforge.runtime.model import Program

from .nets import modes, on, pearson, tiny_resnet, top5_agree

transformers = pytest.importorskip("transformers")
from .qwen2_step import Qwen2Step, empty_cache, tiny_qwen2  # noqa: E402


@pytest.fixture(scope="module")
def resnet():
    return tiny_resnet()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2()


def _resnet_case(resnet, dtype):
    x = torch.randn(2, 3, 8, 8)
    prog = compile_model(resnet, (x,), dtype=dtype)
    with torch.no_grad():
        ref = resnet(x)
    return prog, (x,), ref


def _qwen_case(qwen, dtype):
    step = Qwen2Step(qwen)
    ids = torch.randint(0, qwen.config.vocab_size, (1, 5))
    kc, vc = empty_cache(qwen, 1, 8)
    args = (ids, torch.arange(5), kc, vc)
    prog = compile_model(step, args, dtype=dtype)
    with torch.no_grad():
        ref = qwen(ids).logits
    return prog, args, ref


def _case(name, resnet, qwen):
    net, dt = name.split("-")
    dtype = None if dt == "fp32" else torch.bfloat16
    return _resnet_case(resnet, dtype) if net == "resnet" else _qwen_case(qwen, dtype)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _record(prog: Program, mode: str) -> list:
    """Wrap every compiled step so that calls log (step, tensors read, destinations, tensors
    written)."""
    log: list = []
    for c in prog.compiled_steps(mode):
        fn = c.fn

        def spy(xs, dests, c=c, fn=fn):
            res = fn(xs, dests)
            log.append((c, list(xs), list(dests), list(res)))
            return res

        c.fn = spy
    return log


CASES = ["resnet-bf16", "resnet-fp32", "qwen-fp32", "qwen-bf16"]


@pytest.mark.parametrize("mode", modes("interpret", "gpu"))
@pytest.mark.parametrize("case", CASES)
def test_every_intermediate_lies_in_the_arena_at_its_offset(case, mode, resnet, qwen):
    prog, args, _ = _case(case, resnet, qwen)
    prog.cuda_graph = False  # step by step on the GPU too, so each step's tensors are seen
    plan = prog.buffer_plan
    assert plan is not None and plan.offsets
    log = _record(prog, mode)
    prog.run(*on(mode, *args), mode=mode)
    arena = prog.arena(mode)
    assert arena is not None and arena.numel() == plan.arena_bytes
    base = arena.data_ptr()

    def where(v) -> int | None:
        s = plan.storage(v.id)
        return None if s is None else base + plan.offsets[s]

    seen_reads = seen_writes = 0
    written: set[int] = set()
    for c, xs, dests, res in log:
        for v, x in zip(c.read_values, xs, strict=True):
            at = where(v)
            if at is not None:
                assert x.data_ptr() == at, (c.step.label, v.id)
                assert at + x.numel() * x.element_size() <= base + plan.arena_bytes
                seen_reads += 1
        for v, d, r in zip(c.write_values, dests, res, strict=True):
            if v.id in plan.offsets:  # bytes of its own: handed its arena view, written there
                assert d is not None and d.data_ptr() == base + plan.offsets[v.id]
                assert tuple(d.shape) == v.shape and d.is_contiguous()
                assert r.data_ptr() == d.data_ptr(), (c.step.label, c.runs_on)
                written.add(v.id)
                seen_writes += 1
            else:
                assert d is None
                if v.id in plan.views:  # a view step's output: a view of its base's bytes
                    assert r.data_ptr() == where(v)
    assert written == set(plan.offsets)  # every arena value was written where planned
    assert seen_reads >= seen_writes > 0


@pytest.mark.parametrize("case", CASES)
def test_poisoned_arena_gives_the_same_outputs(case, resnet, qwen):
    prog, args, ref = _case(case, resnet, qwen)
    first = _first(prog.run(*args, mode="interpret"))
    prog.arena("interpret").fill_(0xFF)  # NaN in every float dtype, -1 in the integer ones
    again = _first(prog.run(*args, mode="interpret"))
    assert torch.equal(again, first)
    assert pearson(again, ref) > 0.999
    if case.startswith("resnet"):
        assert top5_agree(again, ref)
    # exactly what the executor computes without an arena (every value allocated by torch)
    plain = compile_model(*_plain_args(case, resnet, qwen, args))
    plain.buffer_plan = None
    assert torch.equal(_first(plain.run(*args, mode="interpret")), again)
    assert plain.arena("interpret").numel() == 0


def _plain_args(case, resnet, qwen, args):
    model = resnet if case.startswith("resnet") else Qwen2Step(qwen)
    return model, args, None if case.endswith("fp32") else torch.bfloat16


def _clobber(plan) -> tuple[int, int]:
    """Two values of the plan where the later-written one (b) is written while the other (a)
    still has a reader to come; b is moved onto a's bytes."""
    for a in sorted(plan.offsets):
        for b in sorted(plan.offsets):
            (a0, a1), (b0, _) = plan.lifetimes[a], plan.lifetimes[b]
            if a0 < b0 < a1 and plan.sizes[b] and plan.offsets[b] != plan.offsets[a]:
                plan.offsets[b] = plan.offsets[a]
                plan.arena_bytes = max(plan.arena_bytes, plan.offsets[a] + plan.sizes[b])
                return a, b
    raise AssertionError("no two values with overlapping lifetimes")


@pytest.mark.parametrize("case", ["resnet-bf16", "qwen-fp32"])
def test_a_corrupted_plan_breaks_the_outputs(case, resnet, qwen):
    prog, args, ref = _case(case, resnet, qwen)
    good = _first(prog.run(*args, mode="interpret"))
    assert pearson(good, ref) > 0.999
    bad_prog, _, _ = _case(case, resnet, qwen)
    _clobber(bad_prog.buffer_plan)
    with pytest.raises(ArgumentError, match="overlap"):
        bad_prog.buffer_plan.check()
    bad = _first(bad_prog.run(*args, mode="interpret"))
    assert not torch.allclose(bad.float(), good.float(), rtol=1e-2, atol=1e-2)


def test_arena_reuses_memory_and_reports_it(resnet):
    prog, args, _ = _case("resnet-bf16", resnet, None)
    plan = prog.buffer_plan
    assert plan.live_bytes <= plan.arena_bytes < plan.no_reuse_bytes
    rep = prog.memory_report()
    assert rep["arena_bytes_planned"] == plan.arena_bytes
    assert rep["no_reuse_bytes"] == plan.no_reuse_bytes
    # bf16 on the interpreter: every conv, pool and the GEMM write the arena in place
    assert rep["steps_copy"] == 0 and rep["steps_in_place"] >= 8 and rep["steps_view"] == 1
    text = prog.describe()
    assert "arena writes: " in text and "0 copy their result in" in text
    # The GPU's measured figures, as the capture records them, are shown too.
    measured = {"device": "gpu", "activation_bytes_measured": 3 << 20,
                "graph_pool_extra_bytes": 1 << 20, "peak_bytes_measured": 4 << 20}  # fmt: skip
    prog._memory = dict(measured)
    try:
        text = prog.describe()
        assert "measured (gpu): activations 3.00 MiB (arena 2.00 MiB + " in text
        assert prog.memory_report()["activation_bytes_measured"] == 3 << 20
    finally:
        prog._memory = {}
    fp32, _, _ = _case("resnet-fp32", resnet, None)
    assert fp32.memory_report()["steps_copy"] >= 7  # torch references copy into the arena


def test_jit_program_writes_given_outputs():
    """JitProgram.run(outputs=...): the kernels store into the given tensors; outputs that have
    no allocation of their own (an input returned, a value returned twice) are copied in;
    None allocates; a wrong tensor is an ArgumentError."""
    from kernforge.codegen import contiguous_strides, lower
    from kernforge.ir import Graph
    from kernforge.runtime.program import JitProgram

    g = Graph("outs")
    x = g.input((5, 7), "float32", "x")
    y = g.add("exp", [x])
    z = g.add("sum", [g.add("mul", [y, x])], axes=(1,), keepdims=False)
    g.set_outputs([y, z, x, y])
    prog = JitProgram(g, lower(g, [contiguous_strides(x.shape)], True), True)
    xs = torch.randn(5, 7)
    want = prog.run([xs])
    outs = [torch.full((5, 7), float("nan")), None, torch.full((5, 7), float("nan")),
            torch.full((5, 7), float("nan"))]  # fmt: skip
    got = prog.run([xs], outputs=outs)
    assert got[0] is outs[0] and got[2] is outs[2] and got[3] is outs[3]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ArgumentError, match="outputs"):
        prog.run([xs], outputs=[None, None])
    with pytest.raises(ArgumentError, match=r"outputs\[0\]"):
        prog.run([xs], outputs=[torch.empty(5, 8), None, None, None])
    with pytest.raises(ArgumentError, match="contiguous"):
        prog.run([xs], outputs=[torch.empty(7, 5).t(), None, None, None])


@pytest.mark.gpu
def test_gpu_memory_report_measures_the_captured_program(resnet):
    x = torch.randn(4, 3, 16, 16)
    prog = compile_model(resnet.cuda(), (x.cuda(),), dtype=torch.bfloat16)
    resnet.cpu()
    out = prog(x.cuda())
    again = prog(x.cuda())
    torch.testing.assert_close(again, out)
    rep = prog.memory_report()
    assert rep["activation_bytes_measured"] >= rep["arena_bytes_planned"] > 0, rep
    assert rep["peak_bytes_measured"] >= rep["arena_bytes_planned"], rep
    arena = prog.arena("gpu")
    assert arena.is_cuda and arena.numel() == rep["arena_bytes_planned"]
    assert "measured (" in prog.describe()
