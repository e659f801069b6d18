"""kernforge.llm.sampling: processors against Hugging Face's, seeded reproducibility, the
sampled distribution, and CUDA-graph capture."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kernforge.errors import ArgumentError, ShapeError
from kernforge.llm.sampling import Sampler, SamplingParams, row_seed


def hf_process(params: SamplingParams, input_ids: torch.Tensor, logits: torch.Tensor):
    """What transformers' generate applies, built the way generate builds it."""
    scores = logits.float()
    if params.repetition_penalty != 1.0:
        proc = RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty)
        scores = proc(input_ids, scores)
    if params.temperature > 0:  # do_sample
        if params.temperature != 1.0:
            scores = TemperatureLogitsWarper(params.temperature)(input_ids, scores)
        if params.top_k:
            scores = TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1)(input_ids, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1)(input_ids, scores)
    return scores


SETTINGS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.0, top_k=1000),  # k > vocab: no-op
    SamplingParams(temperature=1.3, top_k=1),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=0.6, top_k=7, top_p=0.9),
    SamplingParams(temperature=1.2, top_k=20, top_p=0.5, repetition_penalty=0.8),
    SamplingParams(temperature=0.5, top_p=0.3, repetition_penalty=1.5),
]


@pytest.mark.parametrize("params", SETTINGS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_process_matches_transformers(params, dtype):
    batch, vocab, length = 5, 97, 9
    prompts = torch.randint(0, vocab, (batch, length))
    logits = (torch.randn(batch, vocab) * 3).to(dtype)
    sampler = Sampler(params, batch, vocab)
    sampler.reset(prompts.tolist(), seeds=list(range(batch)))
    got = sampler.process(logits)
    assert got.dtype == torch.float32 and got.shape == (batch, vocab)
    expected = hf_process(params, prompts, logits)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # After a step the penalty also counts the sampled tokens, as HF's growing input_ids do.
    tokens = sampler.sample(logits)
    logits2 = (torch.randn(batch, vocab) * 3).to(dtype)
    grown = torch.cat([prompts, tokens[:, None]], dim=1)
    torch.testing.assert_close(
        sampler.process(logits2), hf_process(params, grown, logits2), rtol=0, atol=0
    )


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.randn(6, 33).to(torch.bfloat16)
    logits[2, 7] = logits[2, 20] = logits[2].max() + 1  # a tie: the lowest id wins
    sampler = Sampler(SamplingParams(), 6, 33)
    sampler.reset([[1]] * 6)
    for _ in range(3):
        tokens = sampler.sample(logits)
        assert torch.equal(tokens, logits.float().argmax(-1))
    assert tokens[2].item() == 7
    assert sampler.step.item() == 3


def test_greedy_with_penalty_is_argmax_of_penalized():
    params = SamplingParams(repetition_penalty=1.4)
    batch, vocab = 4, 50
    prompts = torch.randint(0, vocab, (batch, 6))
    sampler = Sampler(params, batch, vocab)
    sampler.reset(prompts.tolist())
    ids = prompts
    for _ in range(4):
        logits = torch.randn(batch, vocab)
        tokens = sampler.sample(logits)
        assert torch.equal(tokens, hf_process(params, ids, logits).argmax(-1))
        ids = torch.cat([ids, tokens[:, None]], dim=1)


def test_top_k_1_is_argmax_even_with_temperature():
    logits = torch.randn(8, 64)
    sampler = Sampler(SamplingParams(temperature=2.5, top_k=1, top_p=0.9), 8, 64)
    sampler.reset([[0]] * 8)
    assert torch.equal(sampler.sample(logits), logits.argmax(-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, seed=11),
        SamplingParams(temperature=1.0, top_k=8, seed=11),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11),
        SamplingParams(temperature=0.9, top_k=16, top_p=0.95, repetition_penalty=1.2, seed=11),
    ],
    ids=repr,
)
def test_seeded_runs_reproduce_and_streams_differ(params):
    batch, vocab, steps = 16, 200, 5
    # Flat logits so that every row and step has many likely tokens.
    logits = [(torch.randn(vocab) * 0.1).expand(batch, vocab).contiguous() for _ in range(steps)]

    def run(seed_params, seeds=None):
        sampler = Sampler(seed_params, batch, vocab)
        sampler.reset([[1, 2]] * batch, seeds=seeds)
        return torch.stack([sampler.sample(x) for x in logits])  # [steps, batch]

    first, again = run(params), run(params)
    assert torch.equal(first, again)
    other = run(SamplingParams(**{**params.__dict__, "seed": 12}))
    assert (first != other).float().mean() > 0.5
    # Rows with the same logits draw from different streams; successive steps differ too.
    differ = first[:, :, None] != first[:, None, :]  # [steps, row, row]
    assert differ.float().sum() / (steps * batch * (batch - 1)) > 0.5
    assert (first[1:] != first[:-1]).float().mean() > 0.5


def test_reset_restarts_the_stream_and_random_seed_is_reported():
    sampler = Sampler(SamplingParams(temperature=1.0), 4, 300)
    logits = torch.randn(4, 300) * 0.1
    seed = sampler.reset([[3]] * 4)
    assert isinstance(seed, int) and sampler.seed == seed
    first = [sampler.sample(logits) for _ in range(3)]
    sampler.reset([[3]] * 4, seeds=None)  # a new random seed
    assert sampler.seed != seed
    replay = Sampler(SamplingParams(temperature=1.0, seed=seed), 4, 300)
    assert replay.reset([[3]] * 4) == seed
    assert all(torch.equal(a, replay.sample(logits)) for a in first)


def test_per_row_seeds_follow_the_prompt_not_the_row():
    vocab = 150
    logits = torch.randn(vocab) * 0.1
    alone = Sampler(SamplingParams(temperature=1.0, top_k=50), 1, vocab)
    alone.reset([[5, 6]], seeds=[77])
    batched = Sampler(SamplingParams(temperature=1.0, top_k=50), 4, vocab)
    batched.reset([[1], [2], [3], [5, 6]], seeds=[1, 2, 3, 77])
    assert batched.seed is None
    for _ in range(4):
        a = alone.sample(logits[None])
        b = batched.sample(logits.expand(4, vocab).contiguous())
        assert a.item() == b[3].item()


@pytest.mark.parametrize("filters", [{"top_k": 9}, {"top_p": 0.6}, {"top_k": 12, "top_p": 0.7}])
def test_filtered_draw_is_the_full_draw_over_processed_logits(filters):
    # The noise is keyed on token ids, so top-k / top-p draw exactly what the plain sampler
    # draws from the processed logits: the same seed, the same token.
    batch, vocab = 64, 80
    filtered = Sampler(SamplingParams(temperature=1.0, seed=8, **filters), batch, vocab)
    full = Sampler(SamplingParams(temperature=1.0, seed=8), batch, vocab)
    filtered.reset([])
    full.reset([])
    for _ in range(3):
        logits = torch.randn(batch, vocab) * 2
        processed = filtered.process(logits)
        assert torch.equal(filtered.sample(logits), full.sample(processed))


def test_row_seed_mixes_seed_and_row():
    keys = {row_seed(s, r) for s in range(20) for r in range(20)}
    assert len(keys) == 400 and all(0 <= k < 2**32 for k in keys)


def _z_scores(tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = n * probs.double()
    se = (n * probs.double() * (1 - probs.double())).sqrt().clamp_min(1e-12)
    return (counts - expected) / se


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, seed=3),
        SamplingParams(temperature=1.5, top_k=3, seed=4),
        SamplingParams(temperature=1.0, top_p=0.7, seed=5),
        SamplingParams(temperature=1.0, top_k=4, top_p=0.8, seed=6),
    ],
    ids=repr,
)
def test_frequencies_match_processed_softmax(params):
    batch, vocab = 20000, 6
    row = torch.tensor([0.3, 1.1, -0.4, 0.9, 0.0, -1.2])
    logits = row.expand(batch, vocab).contiguous()
    sampler = Sampler(params, batch, vocab)
    sampler.reset([])
    probs = sampler.process(logits).softmax(-1)[0]
    tokens = sampler.sample(logits)
    z = _z_scores(tokens, probs)
    assert z.abs().max() < 5, (z, probs)
    assert (torch.bincount(tokens, minlength=vocab)[probs == 0] == 0).all()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=5, seed=1),
        SamplingParams(temperature=2.0, top_p=0.6, seed=2),
        SamplingParams(temperature=0.7, top_k=9, top_p=0.7, repetition_penalty=1.3, seed=3),
    ],
    ids=repr,
)
def test_filters_never_pick_outside_the_allowed_set(params):
    batch, vocab = 128, 61
    sampler = Sampler(params, batch, vocab)
    sampler.reset(torch.randint(0, vocab, (batch, 4)).tolist())
    for _ in range(4):
        logits = torch.randn(batch, vocab) * 2
        allowed = sampler.process(logits)  # before sample() marks the new token seen
        tokens = sampler.sample(logits)
        picked = allowed.gather(1, tokens[:, None])
        assert torch.isfinite(picked).all()


def test_penalty_marks_prompt_and_sampled_tokens_seen():
    batch, vocab = 3, 40
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.2, seed=0), 3, 40)
    sampler.reset([[1, 2, 2], [5]])  # row 2 is padding
    expected = torch.zeros(batch, vocab, dtype=torch.bool)
    expected[0, [1, 2]] = True
    expected[1, 5] = True
    assert torch.equal(sampler.seen, expected)
    for _ in range(3):
        tokens = sampler.sample(torch.randn(batch, vocab))
        expected[torch.arange(batch), tokens] = True
        assert torch.equal(sampler.seen, expected)
    assert Sampler(SamplingParams(temperature=1.0), 3, 40).seen is None  # penalty off


def test_reset_is_in_place():
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.1), 4, 32)
    sampler.reset([[1, 2], [3]], seeds=[9, 10])
    ptrs = [t.data_ptr() for t in (sampler.seeds, sampler.step, sampler.seen)]
    sampler.sample(torch.randn(4, 32))
    sampler.reset([[4], [5], [6], [7]])
    assert [t.data_ptr() for t in (sampler.seeds, sampler.step, sampler.seen)] == ptrs
    assert sampler.step.item() == 0
    assert sampler.seen.sum().item() == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.inf},
        {"temperature": "hot"},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"seed": -3},
        {"seed": 1.5},
        {"stop_token_ids": (1, -2)},
    ],
    ids=repr,
)
def test_bad_params_raise(kwargs):
    with pytest.raises(ArgumentError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_params_defaults_and_greedy():
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy
    assert SamplingParams(temperature=0.5, top_k=1).greedy
    assert SamplingParams(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)
    assert SamplingParams(temperature=1).temperature == 1.0


def test_bad_sampler_inputs_raise():
    with pytest.raises(ArgumentError, match="batch"):
        Sampler(SamplingParams(), 0, 10)
    sampler = Sampler(SamplingParams(repetition_penalty=1.1), 2, 10)
    with pytest.raises(ShapeError, match="batch 2"):
        sampler.reset([[1], [2], [3]])
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        sampler.reset([[1, 10]])
    with pytest.raises(ArgumentError, match="one integer"):
        sampler.reset([[1], [2]], seeds=[1])
    sampler.reset([[1]])
    with pytest.raises(ShapeError, match=r"\(2, 10\)"):
        sampler.sample(torch.randn(2, 11))


GRAPH_SETTINGS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=50, seed=2),
    SamplingParams(temperature=0.9, top_p=0.9, seed=3),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.8, repetition_penalty=1.2, seed=4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("params", GRAPH_SETTINGS, ids=repr)
def test_cuda_graph_replay_matches_eager_and_cpu(params, dtype):
    batch, vocab, steps = 8, 32000, 6
    prompts = torch.randint(0, vocab, (batch, 5)).tolist()
    inputs = [(torch.randn(batch, vocab, device="cuda") * 3).to(dtype) for _ in range(steps)]

    eager = Sampler(params, batch, vocab, "cuda")
    eager.reset(prompts)
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside sample() raises
    try:
        want = [eager.sample(x) for x in inputs]
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graphed = Sampler(params, batch, vocab, "cuda")
    static = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture, as torch's docs advise
        graphed.reset(prompts)
        graphed.sample(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graphed.sample(static)
    graphed.reset(prompts)  # in place: the graph still reads these tensors
    for x, expected in zip(inputs, want, strict=True):
        static.copy_(x)
        graph.replay()
        assert torch.equal(out, expected)
    assert graphed.step.item() == steps
    if graphed.seen is not None:
        assert torch.equal(graphed.seen, eager.seen)

    # The same seed draws the same tokens on the CPU (the hash is exact integer math). Only
    # on fp32 logits: bf16 ties at the kth value let topk keep different tied tokens.
    if dtype == torch.float32:
        cpu = Sampler(params, batch, vocab)
        cpu.reset(prompts)
        for x, expected in zip(inputs, want, strict=True):
            assert torch.equal(cpu.sample(x.cpu()), expected.cpu())
