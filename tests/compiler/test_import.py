"""torch.export -> IR: the op table, type promotion, dtype handling and error messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from kernforge import device
from kernforge.compiler import compile_model, import_model, supported_ops
from kernforge.errors import CompileError, UnsupportedError

from .nets import modes, on

ISSUE_OPS = (
    "conv2d", "_native_batch_norm_legit_no_training", "relu", "gelu", "silu", "max_pool2d",
    "adaptive_avg_pool2d", "linear", "addmm", "mm", "bmm", "add", "mul", "exp", "_softmax",
    "layer_norm", "mean", "embedding", "view", "reshape", "permute", "transpose", "cat",
    "slice", "expand", "unsqueeze", "index_copy", "index_put", "scaled_dot_product_attention",
)  # fmt: skip


def test_supported_ops_covers_the_issue_list():
    table = supported_ops()
    names = {k.split(".")[1] for k in table}
    missing = [op for op in ISSUE_OPS if op not in names]
    assert not missing, missing
    assert table["aten.conv2d.default"].startswith("catalog")


class Mixed(nn.Module):
    """Elementwise math with mixed dtypes and scalars, views, cat/slice/expand, embedding,
    layer_norm, softmax, bmm, addmm, gelu (both forms), silu, sdpa, mean."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", torch.rand(8) + 0.5)

    def forward(self, ids, x):
        h = self.emb(ids) + x * 2 - 1  # [2, 5, 8]
        h = self.ln(h)
        g = F.gelu(h) + F.gelu(h, approximate="tanh") + F.silu(h) + torch.exp(-h.abs())
        a = torch.bmm(g, g.transpose(1, 2)).softmax(-1)  # [2, 5, 5]
        q = g.view(2, 5, 2, 4).permute(0, 2, 1, 3)
        att = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        att = att.transpose(1, 2).reshape(2, 5, 8)
        c = torch.cat([a @ g, att[:, :, :4], att[:, :, 4:].expand(2, 5, 4)], -1)
        m = torch.addmm(self.fc.bias, c.reshape(10, 16)[:, :8], self.fc.weight.t())
        return m.mean(0, keepdim=True) * self.scale + (ids > 3).sum().float(), c.unsqueeze(1)


@pytest.mark.parametrize("mode", modes("numpy", "interpret", "gpu"))
def test_mixed_ops_match_eager(mode):
    torch.manual_seed(0)
    model = Mixed().eval()
    ids = torch.randint(0, 11, (2, 5))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = model(ids, x)
    prog = compile_model(model, (ids, x))
    assert all(n.op != "fallback" for n in prog.graph.nodes), prog.describe()
    out = prog.run(*on(mode, ids, x), mode=mode)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o.cpu(), r, rtol=2e-4, atol=2e-4)


def test_bf16_casts_weights_by_recipe_and_inputs_at_entry():
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    imp = import_model(model, (torch.randn(3, 8),), dtype=torch.bfloat16)
    (x,) = imp.graph.inputs
    assert x.dtype == "float32" and x.name == "input"
    weights = [n for n in imp.graph.nodes if n.op == "weight"]
    assert {n.attrs["recipe"] for n in weights} == {
        ("cast", "0.weight", "bfloat16"), ("cast", "0.bias", "bfloat16"),
    }  # fmt: skip
    assert imp.graph.nodes[-1].output.dtype == "bfloat16"


def test_untraceable_model_is_a_compile_error():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x + 1
            return x - 1

    with pytest.raises(CompileError, match="torch.export could not trace Branchy"):
        compile_model(Branchy(), (torch.randn(3),))


def test_not_a_module_and_buffer_mutation():
    with pytest.raises(CompileError, match="takes a torch.nn.Module"):
        compile_model(lambda x: x, (torch.randn(2),))

    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("n", torch.zeros(3))

        def forward(self, x):
            self.n.add_(x)
            return x * 2

    with pytest.raises(UnsupportedError, match="mutates buffers"):
        compile_model(Counter(), (torch.randn(3),))


def test_index_put_kv_write():
    class Put(nn.Module):
        def forward(self, cache, pos, new):
            return torch.index_put(cache, (pos,), new) * 1.5

    cache, pos, new = torch.randn(6, 4), torch.tensor([1, 4]), torch.randn(2, 4)
    prog = compile_model(Put(), (cache, pos, new))
    ref = Put()(cache, pos, new)
    for mode in ("numpy", "interpret" if device.INTERPRET else "gpu"):
        if mode == "gpu" and not torch.cuda.is_available():
            continue
        torch.testing.assert_close(prog.run(*on(mode, cache, pos, new), mode=mode).cpu(), ref)
