"""`l2_coef_schedule`: the factor at chosen steps, its effect on every update, its log (resume:
trainer/test_resume.py)."""

import math

import pytest
import torch
from helpers import (
    Regression,
    RegressionData,
    l2_args,
)

from hf_l2 import CoefSchedule, L2Config, L2Trainer


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        (CoefSchedule("constant"), 7, 1.0),
        (CoefSchedule("linear", end_factor=0.2), 0, 1.0),
        (CoefSchedule("linear", end_factor=0.2), 5, 0.6),  # halfway between 1 and 0.2
        (CoefSchedule("linear", end_factor=3.0), 5, 2.0),  # an end factor above 1 grows the coefficient
        (CoefSchedule("cosine", end_factor=0.2), 5, 0.6),  # a half cosine is halfway at half time too
        (CoefSchedule("cosine"), 10 / 3, 0.75),  # ½·(1 + cos(π/3))
        (CoefSchedule("cosine", end_factor=0.2), 10, 0.2),
        (CoefSchedule("sigmoid", sigmoid_k=0.5, sigmoid_t0=4), 4, 0.5),
        (CoefSchedule("sigmoid", sigmoid_k=0.5), 5, 0.5),  # t₀ defaults to half the total steps
        (CoefSchedule("sigmoid", sigmoid_k=0.5, sigmoid_t0=4, end_factor=0.2), 4, 0.6),
        (CoefSchedule("sigmoid", sigmoid_k=1.0, sigmoid_t0=2), 10**6, 0.0),  # no overflow far out
        (CoefSchedule("sigmoid", sigmoid_k=1.0, sigmoid_t0=10**6), 0, 1.0),
    ],
)
def test_factor_at_chosen_steps(schedule, step, expected):
    assert schedule(step, 10) == pytest.approx(expected, abs=1e-12)


def test_sigmoid_is_recadams_penalty_weight():
    """RecAdam weights its quadratic penalty by 1 − λ(t), λ(t) = 1 / (1 + exp(−k·(t − t₀)))."""
    k, t0 = 0.2, 30
    schedule = CoefSchedule("sigmoid", sigmoid_k=k, sigmoid_t0=t0)
    for t in (0, 10, 29, 30, 31, 75, 200):
        assert schedule(t, 100) == pytest.approx(1 - 1 / (1 + math.exp(-k * (t - t0))), rel=1e-12)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("l2_coef_schedule", "exp", "`l2_coef_schedule`='exp' is not one of"),
        ("l2_coef_end_factor", -0.1, "`l2_coef_end_factor` must be a number ≥ 0"),
        ("l2_sigmoid_k", 0.0, "`l2_sigmoid_k` must be a number > 0"),
        ("l2_sigmoid_t0", -5.0, "`l2_sigmoid_t0` must be a number ≥ 0"),
        ("l2_coef_end_factor", float("inf"), "`l2_coef_end_factor` must be a number ≥ 0"),
    ],
)
def test_bad_schedule_values_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        L2Config(output_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("impl, optim", [("grad", "sgd"), ("loss", "sgd"), ("decoupled", "adamw_torch")])
@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_every_update_uses_the_scheduled_coefficient(tmp_path, impl, optim, name):
    """With x = 0 the task gradient of w is exactly zero, so only the penalty moves it:
    w_T = w_0·Π_t (1 − lr·α·f(t)) in `l2` mode (SGD on Ω, or the decoupled step with any optimizer)."""
    steps, lr, alpha = 5, 0.1, 0.8
    w0 = torch.tensor([1.0, -2.0, 0.5])
    model = Regression(3, w0)
    args = l2_args(tmp_path, l2_mode="l2", l2_impl=impl, optim=optim, learning_rate=lr, l2_coef=alpha,
                   max_steps=steps, l2_coef_schedule=name, l2_coef_end_factor=0.1, l2_sigmoid_k=1.5,
                   l2_sigmoid_t0=2, max_grad_norm=0.0)
    trainer = L2Trainer(model=model, args=args, train_dataset=RegressionData(torch.zeros(8, 3), torch.ones(8)))
    trainer.train()

    schedule = CoefSchedule(name, end_factor=0.1, sigmoid_k=1.5, sigmoid_t0=2)
    factors = [schedule(t, steps) for t in range(steps)]
    expected = w0 * math.prod(1 - lr * alpha * f for f in factors)
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-6, atol=1e-7)
    logged = [h["l2/coef"] for h in trainer.state.log_history if "l2/coef" in h]
    assert logged == pytest.approx([alpha * f for f in factors], rel=1e-12)  # step s logs the α of update s


def test_new_flags_through_hf_argument_parser(tmp_path):
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(L2Config).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--l2_impl", "decoupled", "--l2_lora_delta", "true", "--l2_coef_schedule",
         "sigmoid", "--l2_sigmoid_k", "0.5", "--l2_sigmoid_t0", "100", "--l2_coef_end_factor", "0.1"]
    )
    assert (config.l2_impl, config.l2_lora_delta) == ("decoupled", True)
    assert config.l2_schedule == CoefSchedule("sigmoid", end_factor=0.1, sigmoid_k=0.5, sigmoid_t0=100)
