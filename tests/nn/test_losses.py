"""kernforge.nn.CrossEntropyLoss and FusedLinearCrossEntropy against torch's modules, as an LM
head uses them (shifted labels, ignore_index padding, a tied lm_head weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernforge as kf
from kernforge.nn import CrossEntropyLoss, FusedLinearCrossEntropy
from tests.helpers import DEVICE, TOL, randn
from tests.kernels.test_cross_entropy import close, ref_ce, targets


def test_cross_entropy_loss_matches_torch_module():
    """Classes last: [B, S, V] logits need no transpose (torch's module wants [B, V, S])."""
    logits = randn((2, 5, 37), torch.float32, requires_grad=True)
    labels = targets((2, 5), 37, ignored=[0, 9])
    with kf.backend("triton"):
        loss = CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    (got,) = torch.autograd.grad(loss, [logits])
    ld = logits.detach().double().requires_grad_()
    want = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(ld.transpose(1, 2), labels)
    (want_g,) = torch.autograd.grad(want, [ld])
    close(loss, want, 1e-5, "loss")
    close(got, want_g, 1e-5, "dlogits")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_options(reduction):
    m = CrossEntropyLoss(ignore_index=0, label_smoothing=0.2, z_loss=1e-3, reduction=reduction)
    assert "z_loss=0.001" in repr(m) and m.state_dict() == {}
    logits = randn((6, 50), torch.bfloat16, requires_grad=True)
    labels = targets((6,), 50, ignored=[1], ignore_index=0)
    with kf.backend("triton"):
        loss = m(logits, labels)
    want = ref_ce(logits.detach().double(), labels, ignore_index=0, label_smoothing=0.2,
                  z_loss=1e-3, reduction=reduction)  # fmt: skip
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    close(loss, want, 1e-5, "loss")


class TinyLM(torch.nn.Module):
    """An embedding, a layer and a tied lm_head: the unfused and fused losses of one model."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in many small LMs
        self.loss = FusedLinearCrossEntropy(chunk_size=5)

    def hidden(self, ids):
        return torch.tanh(self.proj(self.embed(ids)))

    def forward(self, ids, labels, fused: bool):
        h = self.hidden(ids)[:, :-1].reshape(-1, self.proj.out_features)
        shifted = labels[:, 1:].reshape(-1)
        if fused:
            return self.loss(h, self.lm_head.weight, shifted)
        return F.cross_entropy(self.lm_head(h).float(), shifted, ignore_index=-100)


def test_fused_linear_cross_entropy_in_a_model():
    """Same loss and the same gradient for every parameter (the tied weight gets both the
    embedding's and the head's parts)."""
    torch.manual_seed(1)
    model = TinyLM(41, 16).to(DEVICE)
    ids = torch.randint(0, 41, (3, 8), device=DEVICE)
    labels = ids.clone()
    labels[0, 5:] = -100  # padding
    with kf.backend("triton"):
        fused = model(ids, labels, fused=True)
    got = torch.autograd.grad(fused, list(model.parameters()))
    unfused = model(ids, labels, fused=False)
    want = torch.autograd.grad(unfused, list(model.parameters()))
    close(fused, unfused, 1e-5, "loss")
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        close(g, w, 1e-4, name)


def test_fused_module_attributes():
    m = FusedLinearCrossEntropy(ignore_index=-1, label_smoothing=0.1, z_loss=1e-4,
                                reduction="sum", chunk_size=128)  # fmt: skip
    assert list(m.parameters()) == [] and m.state_dict() == {}
    assert (m.ignore_index, m.reduction, m.chunk_size) == (-1, "sum", 128)
    assert "chunk_size=128" in repr(m)


def test_fused_module_with_bias_bf16():
    h = randn((9, 16), torch.bfloat16, requires_grad=True)
    w = randn((30, 16), torch.bfloat16, scale=0.5, requires_grad=True)
    b = randn((30,), torch.bfloat16, requires_grad=True)
    t = targets((9,), 30, ignored=[2])
    m = FusedLinearCrossEntropy(z_loss=1e-3, chunk_size=4)
    with kf.backend("triton"):
        loss = m(h, w, t, b)
    got = torch.autograd.grad(loss, [h, w, b])
    hd, wd, bd = (a.detach().double().requires_grad_() for a in (h, w, b))
    want = ref_ce(F.linear(hd, wd, bd), t, z_loss=1e-3)
    want_g = torch.autograd.grad(want, [hd, wd, bd])
    close(loss, want, 2 * TOL[torch.bfloat16], "loss")
    for g, wg in zip(got, want_g, strict=True):
        assert g.dtype == torch.bfloat16
        close(g, wg, 2 * TOL[torch.bfloat16], "grad")


def test_modules_compile_without_graph_breaks():
    ce = CrossEntropyLoss(z_loss=1e-3)
    flce = FusedLinearCrossEntropy(label_smoothing=0.1, chunk_size=3)

    def f(h, w, t):
        return ce(F.linear(h, w), t) + flce(h, w, t)

    h = randn((7, 8), torch.float32, requires_grad=True)
    w = randn((20, 8), torch.float32, requires_grad=True)
    t = targets((7,), 20, ignored=[1])
    with kf.backend("triton"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True)(h, w, t)
        got = torch.autograd.grad(out, [h, w])
    hd, wd = (a.detach().double().requires_grad_() for a in (h, w))
    logits = F.linear(hd, wd)
    want = ref_ce(logits, t, z_loss=1e-3) + ref_ce(logits, t, label_smoothing=0.1)
    want_g = torch.autograd.grad(want, [hd, wd])
    close(out, want, 1e-5, "loss")
    for g, wg in zip(got, want_g, strict=True):
        close(g, wg, 1e-5, "grad")


def test_float64_falls_back_to_torch():
    h = randn((5, 8), torch.float64, requires_grad=True)
    w = randn((20, 8), torch.float64, requires_grad=True)
    t = targets((5,), 20)
    with pytest.warns(kf.FallbackWarning):
        loss = FusedLinearCrossEntropy()(h, w, t)
    torch.testing.assert_close(loss, ref_ce(F.linear(h, w), t))
