"""`l2_mode="l2_sp_fisher"`: F is the mean of squared per-example gradients at θ₀, and the penalty weighted by it
is exact on every impl, like L2-SP."""

import re

import pytest
import torch
from helpers import (
    QKV,
    TokenDataset,
    fisher_trainer,
    l2_args,
    max_rel_diff,
    params_of,
    run_two_processes,
    tiny_gpt2,
)

import hf_l2.penalty
import hf_l2.trainer
from hf_l2 import L2Trainer
from hf_l2.chunks import chunk_slices
from hf_l2.fisher import normalize_fisher
from hf_l2.penalty import L2Penalty
from hf_l2.saved_state import FISHER_FILE, save_fisher


def penalized_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if not re.search(r"bias|\.ln_", n)]


def reference_fisher(model, data) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean of squared per-example gradients through `.backward()` on each row cut to its labelled length, and,
    for contrast, the square of the mean gradient (the known EWC bug)."""
    names = penalized_names(model)
    params = dict(model.named_parameters())
    squares = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    means = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for i in range(len(data)):
        row = data[i]
        keep = int((row["labels"] != -100).nonzero().max()) + 1  # the padding is only ever labelled -100
        model.zero_grad()
        model(input_ids=row["input_ids"][None, :keep], labels=row["labels"][None, :keep]).loss.backward()
        for n in names:
            squares[n] += params[n].grad.double() ** 2
            means[n] += params[n].grad.double()
    return {n: s / len(data) for n, s in squares.items()}, {n: (m / len(data)) ** 2 for n, m in means.items()}


def test_fisher_is_the_mean_of_squared_per_example_gradients(tmp_path):
    data = TokenDataset(n=12)
    trainer = fisher_trainer(tmp_path, data=data, l2_fisher_normalize=False, max_steps=1, learning_rate=0.0)
    trainer.train()
    got = trainer.l2_terms.penalty.fisher
    expected, square_of_mean = reference_fisher(tiny_gpt2(), data)
    assert sorted(got) == sorted(expected)
    for n in expected:
        torch.testing.assert_close(got[n].double(), expected[n], rtol=1e-5, atol=1e-10)
    # The data make the bug visible: the square of the mean gradient is far from F.
    total = lambda f: sum(t.sum() for t in f.values())  # noqa: E731
    assert total(square_of_mean) < 0.5 * total(expected)
    assert trainer.l2_fisher_source == {"data": "the training set", "examples": 12, "normalized": False}


def test_normalized_fisher_has_mean_one(tmp_path):
    trainer = fisher_trainer(tmp_path, max_steps=1)
    trainer.train()
    fisher = trainer.l2_terms.penalty.fisher
    mean = sum(f.double().sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert float(mean) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("impl", ["grad", "loss", "decoupled"])
def test_a_fisher_of_ones_is_l2_sp(tmp_path, impl, normalize):
    common = dict(l2_impl=impl, l2_coef=1.0, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                  max_grad_norm=0.5)
    sp = tiny_gpt2()
    L2Trainer(model=sp, args=l2_args(tmp_path / "sp", l2_mode="l2_sp", **common), train_dataset=TokenDataset()).train()
    model = tiny_gpt2()
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    save_fisher(ones, {}, str(tmp_path / "ones"), {"data": "ones"})
    trainer = fisher_trainer(tmp_path / "f", model, l2_fisher_path=str(tmp_path / "ones" / FISHER_FILE),
                             l2_fisher_normalize=normalize, **common)
    trainer.train()
    assert max_rel_diff(params_of(model), params_of(sp)) < 1e-7
    assert trainer.l2_fisher_source["path"].endswith(FISHER_FILE)


def hand_loop_with_fisher(data, fisher, alpha, clip, lr, steps):
    """SGD on Σ token losses / tokens of the window + (α/2)·Σ F·(θ − θ₀)² written per parameter, clipped."""
    model = tiny_gpt2()
    params = dict(model.named_parameters())
    anchor = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = data[list(range(len(data)))]
    tokens = (batch["labels"] != -100).sum()  # transformers counts GPT-2's labels unshifted (see test_exactness)
    for _ in range(steps):
        opt.zero_grad()
        for i in range(0, len(data), 2):
            mb = {k: v[i:i + 2] for k, v in batch.items()}
            (model(**mb).loss * (mb["labels"][:, 1:] != -100).sum() / tokens).backward()
        omega = sum(0.5 * alpha * (fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher)
        omega.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return params_of(model)


def test_grad_and_loss_match_a_hand_written_loop_with_accumulation_and_clipping(tmp_path):
    data, alpha, clip, lr, steps = TokenDataset(n=8), 0.7, 0.5, 0.1, 3
    results = {}
    for impl in ("grad", "loss"):
        model = tiny_gpt2()
        trainer = fisher_trainer(tmp_path / impl, model, data, l2_impl=impl, l2_coef=alpha, max_grad_norm=clip,
                                 optim="sgd", learning_rate=lr, max_steps=steps, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=4)
        trainer.train()
        results[impl] = params_of(model)
        assert max(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h) > clip  # clipping active
        fisher = {n: f.clone() for n, f in trainer.l2_terms.penalty.fisher.items()}
    assert max(f.max() for f in fisher.values()) > 10 * min(f.min() for f in fisher.values())  # F is not flat
    expected = hand_loop_with_fisher(data, fisher, alpha, clip, lr, steps)
    assert max_rel_diff(results["grad"], expected) < 1e-5
    assert max_rel_diff(results["loss"], expected) < 1e-5
    assert max_rel_diff(results["loss"], results["grad"]) < 1e-6


def test_decoupled_is_a_hand_written_pull_with_fisher(tmp_path):
    # lr·α·max F ≈ 0.56 (max F ≈ 56 here): every value moves toward θ₀, none past it
    data, alpha, lr, steps = TokenDataset(n=8), 0.2, 0.05, 3
    model = tiny_gpt2()
    trainer = fisher_trainer(tmp_path, model, data, l2_impl="decoupled", l2_coef=alpha, optim="sgd", learning_rate=lr,
                             max_steps=steps, per_device_train_batch_size=8, max_grad_norm=0.0)
    trainer.train()
    fisher = trainer.l2_terms.penalty.fisher

    ref = tiny_gpt2()
    params = dict(ref.named_parameters())
    anchor = {n: p.detach().clone() for n, p in params.items()}
    batch = data[list(range(8))]
    for _ in range(steps):
        ref.zero_grad()
        # Σ token losses / the Trainer's (unshifted) token count, as in `hand_loop_with_fisher`
        (ref(**batch).loss * (batch["labels"][:, 1:] != -100).sum() / (batch["labels"] != -100).sum()).backward()
        with torch.no_grad():
            for n, p in params.items():
                if n in fisher:  # the pull first, at the weights the gradient was taken at, then SGD
                    p -= lr * alpha * fisher[n] * (p - anchor[n])
                p -= lr * p.grad
    assert max_rel_diff(params_of(model), params_of(ref)) < 1e-5


def test_decoupled_refuses_a_pull_past_the_anchor_on_its_largest_fisher_weight(tmp_path):
    """lr·α = 0.1 passes at construction, but normalized F has values far above 1: lr·α·max F ≥ 1 would put those
    values past θ₀ at every step. F is known at the first step, and the check uses it."""
    data = TokenDataset(n=8)
    trainer = fisher_trainer(tmp_path, tiny_gpt2(), data, l2_impl="decoupled", l2_coef=2.0, optim="sgd",
                             learning_rate=0.05, max_steps=2, per_device_train_batch_size=8)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=r"lr·α·F = 0.05 × 2 × [\d.]+ \(the largest Fisher weight\).*≥ 1") as caught:
        trainer.train()
    peak = max(float(f.max()) for f in trainer.l2_terms.penalty.fisher.values())
    assert peak > 10 and f"Keep α below {1 / (0.05 * peak):g}" in str(caught.value)
    assert all(torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())  # refused before any step


def test_penalty_is_not_stuck_at_zero(tmp_path):
    """The known EWC bug: a penalty that stays 0 (F all zero, or θ₀ taken at the current weights each step)."""
    model = tiny_gpt2()
    trainer = fisher_trainer(tmp_path, model, l2_coef=1.0, max_steps=4)
    trainer.train()
    penalties = [h["l2/penalty"] for h in trainer.state.log_history if "l2/penalty" in h]
    assert len(penalties) == 4 and all(p > 1e-3 for p in penalties)
    # The last one is Ω recomputed here from the start weights, the final weights and F.
    start, fisher = params_of(tiny_gpt2()), trainer.l2_terms.penalty.fisher
    final = params_of(model)
    omega = sum(0.5 * (fisher[n].double() * (final[n] - start[n]).double() ** 2).sum() for n in fisher)
    assert penalties[-1] == pytest.approx(float(omega), rel=1e-5)


def test_fisher_and_anchor_in_the_output_folder(tmp_path):
    trainer = fisher_trainer(tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / FISHER_FILE).is_file() and (tmp_path / "out" / "l2_anchor.safetensors").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Fisher-weighted L2-SP" in card and "over 16 examples of the training set" in card


def test_fisher_dataset_is_used(tmp_path):
    trainer = fisher_trainer(tmp_path, max_steps=1, l2_fisher_samples=5, l2_fisher_normalize=False)
    trainer.fisher_dataset = TokenDataset(seed=3)
    trainer.train()
    assert trainer.l2_fisher_source["examples"] == 5 and "fisher_dataset" in trainer.l2_fisher_source["data"]


def test_sharded_pieces_cut_the_fisher_like_the_anchor():
    """Bound to a piece (as under FSDP), F and θ₀ are cut alike: Ω and ∇Ω equal the whole-tensor ones restricted."""
    from hf_l2.sharding import Piece

    g = torch.Generator().manual_seed(0)
    full = torch.randn(6, 4, generator=g)
    anchor, fisher = torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g)
    piece_param = torch.nn.Parameter(full[2:5].clone())  # rows 2..4 of the full tensor
    penalty = L2Penalty(1.5, 0.0, ["w"], [], {"w": anchor.clone()})
    penalty.set_fisher({"w": fisher.clone()})
    penalty.bind({"w": Piece(piece_param, start=8, shape=torch.Size([6, 4]), replicas=1)})
    expected = 0.75 * (fisher[2:5] * (full[2:5] - anchor[2:5]) ** 2).sum()
    torch.testing.assert_close(penalty.value(), expected)
    penalty.add_to_grads_()
    torch.testing.assert_close(piece_param.grad, 1.5 * fisher[2:5] * (full[2:5] - anchor[2:5]))
    assert penalty.fisher_layout["w"] == (8, torch.Size([6, 4]))


# Several engine chunks (a 300k limit instead of 2**24) and several CPU blocks per tensor (BLOCK_NUMEL = 2**18):
# 700×401 and 600×500 values are cut into two blocks each, the first with a tail that is not a multiple of any
# vector width; the transposed one has no flat view (one block); "c" is tiny.
ENGINE_SHAPES = {"a": (700, 401), "b": (30, 50), "c": (5,), "d": (600, 500)}


def engine_penalty(monkeypatch, fisher: dict[str, torch.Tensor] | None, alpha=0.3):
    """An L2Penalty with (or without) F over fresh parameters, all made the same way from one seed."""
    monkeypatch.setattr(hf_l2.penalty, "chunk_slices", lambda sizes: chunk_slices(sizes, limit=300_000))
    g = torch.Generator().manual_seed(0)
    params = {}
    for name, shape in ENGINE_SHAPES.items():
        values = torch.randn(shape[::-1] if name == "b" else shape, generator=g)
        params[name] = torch.nn.Parameter(values.t() if name == "b" else values)
    assert not params["b"].is_contiguous()
    anchors = {n: p.detach() + 1e-2 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    penalty = L2Penalty(alpha, 0.0, list(params), [], dict(anchors))
    if fisher is not None:
        penalty.set_fisher(fisher)
    penalty.bind(params)
    assert len(chunk_slices([p.numel() for p in params.values()], limit=300_000)) == 2
    return penalty, params, anchors


def run_form(penalty, params, impl, lr=0.05):
    """θ after a decoupled pull, or the gradients of the grad / loss form (the loss one under a factor of 3)."""
    for p in params.values():
        p.grad = None
    if impl == "decoupled":
        penalty.pull_(lambda _: lr)
        return {n: p.detach().clone() for n, p in params.items()}
    if impl == "grad":
        for p in params.values():
            p.grad = torch.zeros_like(p)
        penalty.add_to_grads_()
    else:
        (3.0 * penalty.loss_term()).backward()
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("impl", ["grad", "loss", "decoupled"])
def test_a_fisher_of_ones_is_l2_sp_bit_for_bit_across_chunks_and_blocks(monkeypatch, impl):
    ones = {n: torch.ones(s) for n, s in ENGINE_SHAPES.items()}
    plain = run_form(*engine_penalty(monkeypatch, None), impl)
    weighted = run_form(*engine_penalty(monkeypatch, ones), impl)
    assert all(torch.equal(weighted[n], plain[n]) for n in plain)


@pytest.mark.parametrize("impl", ["grad", "loss", "decoupled"])
def test_fisher_forms_are_the_formulas_across_chunks_and_blocks(monkeypatch, impl):
    g = torch.Generator().manual_seed(1)
    fisher = {n: 2 * torch.rand(s, generator=g) for n, s in ENGINE_SHAPES.items()}
    alpha, lr = 0.3, 0.05
    penalty, params, anchors = engine_penalty(monkeypatch, fisher, alpha)
    start = {n: p.detach().clone() for n, p in params.items()}
    got = run_form(penalty, params, impl, lr)
    pull = {n: alpha * fisher[n] * (start[n] - anchors[n]) for n in params}  # ∇Ω
    expected = {n: start[n] - lr * pull[n] for n in params} if impl == "decoupled" else pull
    if impl == "loss":
        expected = {n: 3.0 * e for n, e in expected.items()}
    for n in params:
        torch.testing.assert_close(got[n], expected[n])
    if impl == "loss":  # the backward consumed what the forward kept: a second backward forms it again
        term = penalty.loss_term()
        term.backward(retain_graph=True)
        term.backward()
        for n, p in params.items():
            torch.testing.assert_close(p.grad, got[n] + 2 / 3 * got[n])


def test_weighted_pull_with_bf16_storage_steps_in_the_parameters_dtype():
    """θ₀ and F in bf16 (`l2_anchor_dtype`), fp32 weights: lr·α·F is formed in fp32, not rounded to bf16 (2⁻⁹)."""
    g = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(700, 401, generator=g))  # two CPU blocks
    anchor = (param.detach() + 0.1 * torch.randn(param.shape, generator=g)).bfloat16()
    fisher = (2 * torch.rand(param.shape, generator=g)).bfloat16()
    penalty = L2Penalty(1.0, 0.0, ["w"], [], {"w": anchor})
    penalty.set_fisher({"w": fisher})
    penalty.bind({"w": param})
    start = param.detach().clone()
    penalty.pull_(lambda _: 0.3)  # not a power of 2: rounding a product to bf16 would show
    expected = 0.3 * fisher.float() * (anchor.float() - start)
    torch.testing.assert_close(param.detach() - start, expected, rtol=1e-4, atol=1e-6)


def test_weighted_value_is_accurate_on_millions_of_values():
    """Ω with F against float64: a plain fp32 norm accumulator would drift by ~10⁻³ over 4M values on the CPU."""
    g = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(2048, 2048, generator=g))
    anchor = param.detach() + 1e-3 * torch.randn(param.shape, generator=g)
    fisher = 2 * torch.rand(param.shape, generator=g)
    penalty = L2Penalty(0.5, 0.0, ["w"], [], {"w": anchor})
    penalty.set_fisher({"w": fisher})
    penalty.bind({"w": param})
    expected = float(0.25 * (fisher.double() * (param.detach().double() - anchor.double()) ** 2).sum())
    assert float(penalty.value()) == pytest.approx(expected, rel=1e-6)
    assert float(penalty.loss_term().detach()) == pytest.approx(expected, rel=1e-6)
    assert float(penalty.statistics()["weighted_drift_sq"]) == pytest.approx(4 * expected, rel=1e-6)


def test_bad_fisher_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="l2_fisher_samples"):
        l2_args(tmp_path, l2_mode="l2_sp_fisher", l2_fisher_samples=0)
    with pytest.raises(ValueError, match="l2_fisher_path"):
        l2_args(tmp_path, l2_mode="l2_sp_fisher", l2_fisher_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="l2_lora_delta"):
        l2_args(tmp_path, l2_mode="l2_sp_fisher", l2_lora_delta=True)


@pytest.mark.distributed
def test_two_process_ddp_equals_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    run_two_processes("ddp_worker.py", str(out), "grad", "l2_sp_fisher")
    ddp = torch.load(out, weights_only=False)
    assert ddp["world_size"] == 2
    model = tiny_gpt2()
    single = fisher_trainer(tmp_path, model, TokenDataset(n=8), per_device_train_batch_size=4,
                            gradient_accumulation_steps=2, max_steps=3, l2_coef=1.0, max_grad_norm=0.5)
    single.train()
    assert max_rel_diff(ddp["params"], params_of(model)) < 1e-6
    last = lambda log: [h for h in log if "l2/penalty" in h][-1]["l2/penalty"]  # noqa: E731
    assert last(ddp["log"]) == pytest.approx(last(single.state.log_history), rel=1e-5) and last(ddp["log"]) > 0


# ---- F files are checked like θ₀ (issue 24, item 6) ---------------------------------------------------------------
def saved_fisher(folder, edit) -> str:
    """An F file of ones for the tiny GPT-2, with `edit` applied to QKV's F, written with valid checksums."""
    fisher = {n: torch.ones_like(p) for n, p in tiny_gpt2().named_parameters() if n in penalized_names(tiny_gpt2())}
    fisher[QKV] = edit(fisher[QKV])
    save_fisher(fisher, {}, str(folder), {"data": "hand-made"})
    return str(folder / FISHER_FILE)


def negative(f):
    f = f.clone()
    f[0, :3] = -1.0
    return f


def with_nan(f):
    f = f.clone()
    f[2, 5] = float("nan")
    return f


@pytest.mark.parametrize(
    ("normalize", "edit", "problem"),
    [
        (False, negative, rf"{QKV}: 3 negative value\(s\) of 768"),
        (True, negative, rf"{QKV}: 3 negative value\(s\) of 768"),
        (True, with_nan, rf"{QKV}: 1 NaN and 0 infinite value\(s\) of 768"),
        (True, lambda f: f.T.contiguous(), rf"{QKV}: F of shape \(48, 16\), the parameter has \(16, 48\)"),
        (True, lambda f: f.to(torch.int32), rf"{QKV}: dtype torch.int32, not a floating-point type"),
    ],
    ids=["negative-raw", "negative-normalized", "nan-normalized", "transposed", "int"],
)
def test_a_bad_fisher_path_is_refused_naming_the_file_the_tensor_and_the_problem(tmp_path, normalize, edit, problem):
    """Before: a negative raw F trained with a negative penalty (−2.27, a push away from θ₀), a transposed F was
    reshaped into place, and NaN or negative F under normalization were blamed on the labels ("F is zero")."""
    path = saved_fisher(tmp_path / "fisher", edit)
    model = tiny_gpt2()
    start = params_of(model)
    trainer = fisher_trainer(tmp_path / "run", model, l2_fisher_path=path, l2_fisher_normalize=normalize)
    with pytest.raises(ValueError, match=rf"{re.escape(path)} is damaged or does not belong to this model: 1 "
                                         rf"problem\(s\), {problem}\. .*`l2_fisher_path`") as caught:
        trainer.train()
    assert "is zero" not in str(caught.value) and "\n" not in str(caught.value)
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # refused before any step


def test_a_non_finite_computed_fisher_is_named_as_such_not_as_zero():
    fisher = {"w": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)}
    with pytest.raises(ValueError, match=r"The Fisher is not finite \(its mean is nan\)"):
        normalize_fisher(fisher)
    with pytest.raises(ValueError, match="The Fisher is zero"):
        normalize_fisher({"w": torch.zeros(3)})
