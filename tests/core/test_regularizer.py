"""regularizer.py alone, built without a Trainer: its logged values, schedule, three ways of adding Ω, F, saved
state and non-finite stop, each against numbers worked out by hand on a two-parameter model."""

import math

import pytest
import torch
from torch import nn

from hf_l2.penalty import L2Penalty
from hf_l2.regularizer import L2Regularizer, non_finite_stop, not_finite
from hf_l2.saved_state import ANCHOR_FILE
from hf_l2.schedule import CoefSchedule

ALPHA, BETA = 0.3, 0.7


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, -2.0]))  # anchored, θ₀ = [0, −1]: θ − θ₀ = [1, −1]
        self.b = nn.Parameter(torch.tensor([[0.5], [3.0]]))  # new: Σθ² = 9.25


def regularizer(mode="l2_sp", impl="grad", schedule=None) -> tuple[Two, L2Regularizer]:
    model = Two()
    penalty = L2Penalty(ALPHA, BETA, ["a"], ["b"], {"a": torch.tensor([0.0, -1.0])})
    return model, L2Regularizer(penalty, mode=mode, impl=impl, schedule=schedule, trainable=["a", "b"])


def test_log_values_by_hand():
    model, reg = regularizer()
    reg.bind(model)
    logs = reg.log_values()
    # Ω = α/2·(1² + 1²) + β/2·(0.5² + 3²)
    assert logs["l2/penalty"] == pytest.approx(ALPHA + BETA / 2 * 9.25, rel=1e-6)
    assert logs["l2/weight_norm"] == pytest.approx(math.sqrt(1 + 4 + 9.25), rel=1e-6)
    assert logs["l2/drift"] == pytest.approx(math.sqrt(2), rel=1e-6)
    assert logs["l2/rel_drift"] == pytest.approx(math.sqrt(2) / 1.0, rel=1e-6)  # ‖θ₀‖ = 1
    assert logs["l2/coef"] == ALPHA
    assert list(logs) == ["l2/penalty", "l2/weight_norm", "l2/drift", "l2/rel_drift", "l2/coef"]


def test_schedule_scales_both_coefficients():
    model, reg = regularizer(schedule=CoefSchedule("linear", end_factor=0.0))
    reg.bind(model)
    reg.start_step(5, 10)  # halfway down a straight line from 1 to 0
    assert reg.factor == 0.5
    assert (reg.penalty.coef, reg.penalty.decay_coef) == (ALPHA / 2, BETA / 2)
    logs = reg.log_values()
    assert logs["l2/penalty"] == pytest.approx((ALPHA + BETA / 2 * 9.25) / 2, rel=1e-6)
    assert logs["l2/coef"] == ALPHA / 2


def test_plain_l2_logs_alpha_and_no_drift():
    model = Two()
    reg = L2Regularizer(L2Penalty(0.0, ALPHA, [], ["a", "b"]), mode="l2")
    reg.bind(model)
    logs = reg.log_values()
    assert logs["l2/penalty"] == pytest.approx(ALPHA / 2 * (1 + 4 + 9.25), rel=1e-6)
    assert logs["l2/coef"] == ALPHA
    assert "l2/drift" not in logs


def test_gradient_and_loss_forms():
    model, reg = regularizer()
    reg.bind(model)
    reg.add_to_grads_()
    torch.testing.assert_close(model.a.grad, torch.tensor([ALPHA, -ALPHA]))  # α·(θ − θ₀)
    torch.testing.assert_close(model.b.grad, BETA * torch.tensor([[0.5], [3.0]]))  # β·θ
    term = reg.loss_term(torch.device("cpu"))
    assert term.requires_grad
    assert term.item() == pytest.approx(ALPHA + BETA / 2 * 9.25, rel=1e-6)


def test_decoupled_pull_runs_inside_the_optimizer_step():
    model, reg = regularizer(impl="decoupled")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.bind(model, optimizer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # θ ← θ − lr·α·(θ − θ₀) and θ ← θ·(1 − lr·β)
    torch.testing.assert_close(model.a.detach(), torch.tensor([1 - 0.03, -2 + 0.03]))
    torch.testing.assert_close(model.b.detach(), torch.tensor([[0.5], [3.0]]) * (1 - 0.07))
    reg.detach_pull()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # no hook left: zero gradients, no change
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_pull_rate_refused_before_training():
    _, reg = regularizer(impl="decoupled")
    with pytest.raises(ValueError, match="is ≥ 1"):
        reg.check_pull_rate(learning_rate=2.0)  # lr·β = 1.4


@pytest.mark.parametrize("normalize, expected", [(False, ALPHA / 2 * (1 + 3)), (True, ALPHA / 2 * (0.5 + 1.5))])
def test_fisher_weights_the_pull(normalize, expected):
    model, reg = regularizer(mode="l2_sp_fisher")
    assert reg.needs_fisher
    reg.set_fisher({"a": torch.tensor([1.0, 3.0])}, {"data": "hand", "examples": 2}, normalize)
    assert not reg.needs_fisher
    assert reg.fisher_source == {"data": "hand", "examples": 2, "normalized": normalize}
    reg.bind(model)
    # Ω's anchored part: α/2·Σ F·(θ − θ₀)², F = [1, 3] (mean 2 when normalized: [0.5, 1.5])
    assert reg.log_values()["l2/penalty"] == pytest.approx(expected + BETA / 2 * 9.25, rel=1e-6)


def test_saved_state_round_trip(tmp_path):
    model, reg = regularizer()
    reg.save(str(tmp_path), source="base-model", main_process=True)
    assert (tmp_path / ANCHOR_FILE).is_file()
    _, other = regularizer()
    other.penalty.anchors["a"] = torch.tensor([5.0, 5.0])  # a trainer built from other weights
    restored = other.restore(str(tmp_path), model, anchor_path=None)
    assert restored.source == "base-model"
    torch.testing.assert_close(other.penalty.anchors["a"], torch.tensor([0.0, -1.0]))
    assert other.restore(str(tmp_path / "empty"), model, anchor_path=None) is None


def test_non_finite_values_stop_with_the_last_finite_step():
    assert not_finite({"l2/penalty": float("nan"), "l2/drift": 1.0, "loss": float("inf")}) == {
        "l2/penalty": pytest.approx(float("nan"), nan_ok=True)
    }
    history = [{"step": 3, "l2/drift": 1.0}, {"step": 4, "l2/drift": float("inf")}]
    error = non_finite_stop("at step 4", ("l2/drift",), ["l2_coef"], "decoupled", history, None)
    assert isinstance(error, FloatingPointError)
    assert "logged at step 3" in str(error) and "lr·α near or above 1" in str(error)
    assert "No checkpoint had been saved yet." in str(error)
