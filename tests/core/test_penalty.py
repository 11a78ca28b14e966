"""penalty.py alone: values and gradients against formulas written out by hand."""

import re

import pytest
import torch
from torch import nn

from hf_l2.argument_checks import compile_patterns
from hf_l2.chunks import CHUNK_NUMEL, chunk_slices
from hf_l2.penalty import L2Penalty, select_parameters, snapshot


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.b = nn.Parameter(torch.tensor([[0.5], [3.0]]))


def test_value_and_gradient_by_hand():
    m = Two()
    anchors = {"a": torch.tensor([0.0, -1.0])}
    pen = L2Penalty(coef=0.3, decay_coef=0.7, anchored=["a"], new=["b"], anchors=anchors)
    pen.bind(dict(m.named_parameters()))
    # Ω = 0.3/2·((1−0)² + (−2+1)²) + 0.7/2·(0.5² + 3²) = 0.15·2 + 0.35·9.25
    assert pen.value().item() == pytest.approx(0.3 + 0.35 * 9.25, rel=1e-6)
    pen.add_to_grads_()
    torch.testing.assert_close(m.a.grad, torch.tensor([0.3, -0.3]))
    torch.testing.assert_close(m.b.grad, torch.tensor([[0.35], [2.1]]))

    m.a.grad = torch.ones(2)  # an existing gradient is added to, not replaced
    m.b.grad = None
    pen.add_to_grads_(scale=torch.tensor(4.0))
    torch.testing.assert_close(m.a.grad, torch.tensor([1 + 1.2, 1 - 1.2]))
    torch.testing.assert_close(m.b.grad, torch.tensor([[1.4], [8.4]]))


def test_loss_term_matches_explicit_autograd():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    params = dict(m.named_parameters())
    anchors = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items() if n.startswith("0.")}
    pen = L2Penalty(0.2, 0.05, list(anchors), ["1.weight", "1.bias"], anchors)
    pen.bind(params)
    term = pen.loss_term()
    (3.0 * term).backward()  # a factor on top, as AMP or GA scaling would apply
    got = {n: p.grad.clone() for n, p in params.items()}

    m.zero_grad()
    explicit = 0.1 * sum(((params[n] - a) ** 2).sum() for n, a in anchors.items())
    explicit = explicit + 0.025 * (params["1.weight"].pow(2).sum() + params["1.bias"].pow(2).sum())
    assert term.item() == pytest.approx(explicit.item(), rel=1e-6)
    (3.0 * explicit).backward()
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.grad)


def test_resized_embedding_anchors_overlapping_rows_only():
    emb = nn.Embedding(6, 2)
    anchor = torch.zeros(4, 2)
    pen = L2Penalty(1.0, 0.5, ["weight"], [], {"weight": anchor})
    pen.bind(dict(emb.named_parameters()))
    w = emb.weight.detach()
    expected = 0.5 * w[:4].pow(2).sum() + 0.25 * w[4:].pow(2).sum()
    assert pen.value().item() == pytest.approx(expected.item(), rel=1e-6)
    pen.add_to_grads_()
    torch.testing.assert_close(emb.weight.grad, torch.cat([w[:4], 0.5 * w[4:]]))


def test_group_statistics_by_hand():
    emb = nn.Embedding(3, 2)
    extra = nn.Parameter(torch.tensor([2.0, -1.0]))
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 4.0]]))
    params = {"emb": emb.weight, "extra": extra}
    # The embedding grew from 2 rows to 3: rows 0-1 are anchored, row 2 is new; "extra" is new altogether.
    pen = L2Penalty(1.0, 1.0, ["emb"], ["extra"], {"emb": torch.tensor([[1.0, 0.0], [0.0, 0.0]])})
    pen.bind(params)
    got = pen.group_statistics(lambda name: name)  # one group per parameter
    # emb: Σθ² over all 3 rows = 1+4+0+1+9+16; Σ(θ−θ₀)² over rows 0-1 = 0+4+0+1; Σθ₀² = 1; 4 anchored, 2 new values
    assert got["emb"] == pytest.approx(
        {"weight_sq": 31.0, "drift_sq": 5.0, "anchor_sq": 1.0, "anchored_values": 4.0, "new_values": 2.0})
    assert got["extra"] == pytest.approx({"weight_sq": 5.0, "anchored_values": 0.0, "new_values": 2.0})
    assert got["all"] == pytest.approx(
        {"weight_sq": 36.0, "drift_sq": 5.0, "anchor_sq": 1.0, "anchored_values": 4.0, "new_values": 4.0})


def test_bf16_and_cpu_anchor_storage():
    m = Two()
    stored = snapshot(dict(m.named_parameters()), ["a", "b"], torch.bfloat16, "cpu")
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert stored["a"].data_ptr() != m.a.data_ptr()
    with torch.no_grad():
        m.a.add_(1.0)
    pen = L2Penalty(2.0, 0.0, ["a", "b"], [], stored)
    pen.bind(dict(m.named_parameters()))
    assert pen.value().dtype == torch.float32
    assert pen.value().item() == pytest.approx(2.0, rel=1e-6)  # (2/2)·(1² + 1²)


def test_chunks_cover_every_tensor_once():
    sizes = [CHUNK_NUMEL // 2, CHUNK_NUMEL // 2, 3, CHUNK_NUMEL * 2, 1]
    covered = [i for sl in chunk_slices(sizes) for i in range(len(sizes))[sl]]
    assert covered == list(range(len(sizes)))
    for sl in chunk_slices(sizes):  # bounded temporaries: a chunk is one tensor or fits in the limit
        assert sl.stop - sl.start == 1 or sum(sizes[sl]) <= CHUNK_NUMEL


def test_selection_rules(gpt2):
    from transformers import Trainer

    named = dict(gpt2.named_parameters())
    assert "lm_head.weight" not in named  # tied to transformer.wte.weight: counted once
    decay = set(Trainer.get_decay_parameter_names(None, gpt2))
    sel = select_parameters(
        named.items(),
        exclude=compile_patterns([r"wpe", r"no_such_param"], "l2_exclude"),
        exclude_names=frozenset(named) - decay,
        new=compile_patterns([r"h\.1\.mlp"], "l2_head_params"),
    )
    assert "transformer.wte.weight" in sel.anchored
    assert not any(re.search(r"bias|ln_|wpe", n) for n in sel.anchored + sel.new)
    assert sel.new == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
    assert sel.unmatched_patterns == ["no_such_param"]
    gpt2.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    frozen = select_parameters(gpt2.named_parameters())
    assert "transformer.h.0.attn.c_attn.weight" not in frozen.anchored


def test_invalid_regex_names_the_field():
    with pytest.raises(ValueError, match="l2_exclude.*not a valid regular expression"):
        compile_patterns(["("], "l2_exclude")


def test_value_and_logged_norms_are_accurate_on_an_embedding_sized_tensor():
    """Against float64 on 16M values (GPT-2's embedding has 38.6M): a whole-tensor fp32 norm on the CPU runs about
    2·10⁻³ low at this size, so Ω and the logged drift and norms would be that far off."""
    g = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(4096, 4096, generator=g) * 0.1 + 0.02)
    anchor = param.detach() + 1e-3 * torch.randn(param.shape, generator=g) + 1e-4
    head = nn.Parameter(torch.randn(4096, 1024, generator=g))
    penalty = L2Penalty(0.5, 0.2, ["w"], ["h"], {"w": anchor})
    penalty.bind({"w": param, "h": head})
    drift_sq = float(((param.detach().double() - anchor.double()) ** 2).sum())
    head_sq = float((head.detach().double() ** 2).sum())
    assert float(penalty.value()) == pytest.approx(0.25 * drift_sq + 0.1 * head_sq, rel=1e-6)
    stats = penalty.statistics()
    assert float(stats["drift_sq"]) == pytest.approx(drift_sq, rel=1e-6)
    assert float(stats["anchor_sq"]) == pytest.approx(float((anchor.double() ** 2).sum()), rel=1e-6)
    assert float(stats["anchored_sq"]) == pytest.approx(float((param.detach().double() ** 2).sum()), rel=1e-6)
    assert float(stats["new_sq"]) == pytest.approx(head_sq, rel=1e-6)
