"""The activation buffer plan: no two live buffers share a byte (random DAGs, checked both
against an independent liveness computation and by running the graph inside the arena), buffers
are reused, the arena is at most the no-reuse total and at least the live lower bound."""

from __future__ import annotations

import random

import pytest
import torch

from kernforge.errors import ArgumentError
from kernforge.ir import Graph
from kernforge.runtime.memory import ALIGNMENT, BufferPlan, nbytes, plan_buffers

from .standin import tiny_graph


def random_dag(rng: random.Random, n_nodes: int) -> tuple[Graph, dict[int, int]]:
    """A random DAG of 1-d float32 values of varied sizes (neg, add, concat, slice) with
    reshape views; returns the graph and the views' aliases (view id -> base id)."""
    g = Graph("random")
    vals = [g.input((rng.randint(1, 300),), "float32", f"x{i}") for i in range(rng.randint(1, 3))]
    aliases: dict[int, int] = {}
    for _ in range(n_nodes):
        a = rng.choice(vals[-6:] if rng.random() < 0.7 else vals)  # mostly recent: real nets
        r = rng.random()
        if r < 0.25:
            v = g.add("neg", [a])
        elif r < 0.45:
            same = [u for u in vals if u.shape == a.shape]
            v = g.add("add", [a, rng.choice(same)])
        elif r < 0.6 and sum(u.size for u in vals[-3:]) < 4000:
            v = g.add("concat", vals[-rng.randint(1, 3) :], axis=0)
        elif r < 0.8 and a.size > 1:
            size = rng.randint(1, a.size - 1)
            v = g.add("slice", [a], starts=(rng.randint(0, a.size - size),), steps=(1,),
                      shape=(size,))  # fmt: skip
        else:
            v = g.add("reshape", [a], shape=a.shape)
            aliases[v.id] = a.id
        vals.append(v)
    outs = {vals[-1].id: vals[-1]}
    for v in rng.sample(vals, min(len(vals), rng.randint(0, 2))):
        outs[v.id] = v
    g.set_outputs(outs.values())
    return g.verify(), aliases


def run_in_arena(g: Graph, plan: BufferPlan, aliases: dict[int, int]) -> list[torch.Tensor]:
    """Execute ``g`` node by node, every intermediate written into its planned arena bytes."""
    arena = torch.full((plan.arena_bytes,), 0xFF, dtype=torch.uint8)  # NaN-poisoned floats
    views = plan.tensors(arena, g)
    env = {v.id: torch.randn(v.shape) for v in g.inputs}
    ref = dict(env)
    for node in g.nodes:
        for store, read in ((env, env), (ref, ref)):
            ins = [read[v.id] for v in node.inputs]
            if node.op == "neg":
                out = -ins[0]
            elif node.op == "add":
                out = ins[0] + ins[1]
            elif node.op == "concat":
                out = torch.cat(ins)
            elif node.op == "slice":
                s = node.attrs["starts"][0]
                out = ins[0][s : s + node.output.shape[0]]
            else:
                out = ins[0].reshape(node.output.shape)
            vid = node.output.id
            if store is env and vid in views and vid not in aliases:
                views[vid].copy_(out)
                out = views[vid]
            elif store is env and vid in aliases:
                out = ins[0].reshape(node.output.shape)  # a view: no copy
            else:
                out = out.clone()
            store[vid] = out
    got = [env[v.id] for v in g.outputs]
    want = [ref[v.id] for v in g.outputs]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return got


def independent_lifetimes(g: Graph, aliases: dict[int, int]) -> dict[int, tuple[int, int]]:
    root = lambda v: root(aliases[v]) if v in aliases else v  # noqa: E731
    life: dict[int, list[int]] = {}
    for i, n in enumerate(g.nodes):
        r = root(n.output.id)
        life.setdefault(r, [i, i])[1] = i
        for u in n.inputs:
            if root(u.id) in life:
                life[root(u.id)][1] = i
    return {k: (a, b) for k, (a, b) in life.items()}


@pytest.mark.parametrize("seed", range(40))
def test_random_dags_no_live_overlap(seed):
    rng = random.Random(seed)
    g, aliases = random_dag(rng, rng.randint(3, 40))
    use_alias = seed % 2 == 0
    plan = plan_buffers(g, aliases=aliases if use_alias else None)
    plan.check()
    aliases = aliases if use_alias else {}
    life = independent_lifetimes(g, aliases)
    outside = {v.id for v in g.inputs} | {v.id for v in g.outputs}
    arena = list(plan.offsets)
    for v in arena:
        assert v not in outside and plan.offsets[v] % ALIGNMENT == 0
        assert plan.lifetimes[v] == life[v]
        assert plan.offsets[v] + plan.sizes[v] <= plan.arena_bytes
    for i, a in enumerate(arena):
        for b in arena[i + 1 :]:
            la, lb = life[a], life[b]
            if la[0] <= lb[1] and lb[0] <= la[1] and plan.sizes[a] and plan.sizes[b]:
                a0, b0 = plan.offsets[a], plan.offsets[b]
                assert a0 + plan.sizes[a] <= b0 or b0 + plan.sizes[b] <= a0, (a, b, la, lb)
    # Every stored intermediate has bytes (itself or through its base).
    root = lambda v: root(aliases[v]) if v in aliases else v  # noqa: E731
    held = outside | {root(v) for v in outside}
    for n in g.nodes:
        if root(n.output.id) not in held:
            assert plan.storage(n.output.id) == root(n.output.id)
    assert plan.live_bytes <= plan.arena_bytes <= plan.no_reuse_bytes
    run_in_arena(g, plan, aliases)


def chain(n: int, size: int = 1000) -> Graph:
    g = Graph("chain")
    v = g.input((size,), "float32", "x")
    for _ in range(n):
        v = g.add("neg", [v])
    g.set_outputs([v])
    return g


def test_chain_reuses_two_buffers():
    g = chain(10)
    plan = plan_buffers(g)
    size = -(-nbytes((1000,), "float32") // ALIGNMENT) * ALIGNMENT
    assert len(plan.offsets) == 9 and plan.no_reuse_bytes == 9 * size
    assert plan.arena_bytes == 2 * size == plan.live_bytes  # ping-pong between two buffers
    assert plan.reuse_ratio == pytest.approx(4.5)
    run_in_arena(g, plan, {})


def test_best_fit_takes_the_tightest_gap():
    # a big value dies, then two small ones live: they go into its hole, not on top.
    g = Graph("holes")
    x = g.input((64,), "float32", "x")
    big = g.add("concat", [x] * 16, axis=0)  # 4 KiB
    small = g.add("slice", [big], starts=(0,), steps=(1,), shape=(64,))  # big's last use
    a = g.add("neg", [small])
    b = g.add("add", [a, small])
    g.set_outputs([b])
    plan = plan_buffers(g)
    plan.check()
    assert plan.arena_bytes == plan.sizes[big.id] + plan.sizes[small.id]
    assert plan.offsets[a.id] < plan.sizes[big.id] + plan.sizes[small.id]
    run_in_arena(g, plan, {})


def test_fused_step_keeps_reads_and_writes_apart():
    g = chain(4)
    ids = [n.output.id for n in g.nodes]
    # one fused kernel reads ids[0] and writes ids[1] and ids[2]: all three live across it
    steps = [([g.inputs[0].id], [ids[0]]), ([ids[0]], [ids[1], ids[2]]), ([ids[2]], [ids[3]])]
    plan = plan_buffers(g, steps=steps)
    plan.check()
    spans = {v: (plan.offsets[v], plan.offsets[v] + plan.sizes[v]) for v in ids[:3]}
    for i in range(3):
        for j in range(i + 1, 3):
            (a0, a1), (b0, b1) = spans[ids[i]], spans[ids[j]]
            assert a1 <= b0 or b1 <= a0
    # stored=: a value kept inside the kernel needs no buffer
    plan2 = plan_buffers(g, steps=steps, stored=[ids[0], ids[2]])
    assert set(plan2.offsets) == {ids[0], ids[2]}


def test_outputs_inputs_weights_and_their_views_stay_out():
    g = tiny_graph()
    plan = plan_buffers(g)
    weights = {n.output.id for n in g.nodes if n.op == "weight"}
    assert not (set(plan.offsets) & (weights | {v.id for v in g.inputs + g.outputs}))
    assert plan.offsets  # linear's output and the cast are intermediates
    # a view that is an output makes its base output storage too
    g2 = Graph("view_out")
    x = g2.input((8,), "float32", "x")
    h = g2.add("neg", [x])
    r = g2.add("reshape", [h], shape=(2, 4))
    g2.set_outputs([r])
    plan2 = plan_buffers(g2, aliases={r.id: h.id})
    assert plan2.offsets == {} and plan2.storage(h.id) is None


def test_json_round_trip_and_errors():
    g, aliases = random_dag(random.Random(7), 30)
    plan = plan_buffers(g, aliases=aliases)
    back = BufferPlan.from_json(plan.to_json())
    assert back == plan
    assert "arena" in plan.describe()
    with pytest.raises(ArgumentError, match="power of two"):
        plan_buffers(g, alignment=100)
    with pytest.raises(ArgumentError, match="not in the graph"):
        plan_buffers(g, aliases={10_000: g.inputs[0].id})
    bad = BufferPlan.from_json(plan.to_json())
    if len(bad.offsets) >= 2:  # force an overlap: check() must catch it
        a, b = sorted(bad.offsets, key=lambda v: bad.lifetimes[v])[:2]
        bad.lifetimes[a] = bad.lifetimes[b] = (0, 10**6)
        bad.offsets[a] = bad.offsets[b] = 0
        with pytest.raises(ArgumentError, match="overlap"):
            bad.check()
