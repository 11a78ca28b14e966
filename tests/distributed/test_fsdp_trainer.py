"""The whole L2Trainer under FSDP2, launched with the shipped `fsdp2.yaml` on 2 CPU processes (gloo).

accelerate 1.15 drops the FSDP plugin on CPU process groups; `tests/distributed/launch_worker.py` puts it back
exactly as accelerate's GPU branch does (see its docstring and docs/distributed.md), so everything from
`accelerator.prepare` on is the GPU code path: DTensor parameters, θ₀ cut to each rank's shard, sharded (DCP)
checkpoints.
"""

import os
import sys

import pytest
import torch
from helpers import TokenDataset, l2_args, max_rel_diff, params_of, run_distributed, tiny_gpt2

from hf_l2 import L2Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch_fsdp2(worker: str, out, *args: str) -> dict:
    """`tests/distributed/<worker>` under `accelerate launch` with the shipped `fsdp2.yaml`, 2 CPU processes; what
    rank 0 saved to ``out``."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "recipes", "accelerate_configs", "fsdp2.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
        os.path.join(ROOT, "tests", "distributed", worker), str(out), *args,
    ]
    run_distributed(command, {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    return launch_fsdp2("launch_worker.py", tmp_path_factory.mktemp("fsdp2") / "results.pt", "grad,loss")


def one_process(tmp_path, impl: str, l2_mode: str = "l2_sp", **overrides):
    """The same 4 steps in one process: batch 4 × accumulation 2 = the 8 sequences of each FSDP step."""
    model = tiny_gpt2()
    args = l2_args(tmp_path / f"single-{l2_mode}-{len(overrides)}", per_device_train_batch_size=4,
                   gradient_accumulation_steps=2, max_steps=4, l2_coef=1.0, l2_impl=impl, max_grad_norm=0.5,
                   l2_mode=l2_mode, **overrides)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset(n=8))
    trainer.train()
    return params_of(model), trainer.state.log_history


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["grad", "loss"])
def test_trainer_under_fsdp2_equals_one_process_and_resumes_exactly(fsdp2_runs, tmp_path, impl):
    run = fsdp2_runs[impl]
    assert run["world_size"] == 2 and run["distributed_type"] == "DistributedType.FSDP"
    assert run["param_type"] == "DTensor"  # fully_shard really wrapped the model

    single, single_log = one_process(tmp_path, impl)
    unpenalized, _ = one_process(tmp_path, impl, l2_mode="none")
    assert max_rel_diff(unpenalized, single) > 1e-3  # a lost or doubled penalty would be seen below
    # Summation order differs between the ranks' reduction and one process (1.04e-6 seen at other versions); the
    # unpenalized run differs by more than 1e-3.
    assert max_rel_diff(run["params"], single) < 5e-6

    logged = lambda log, key: [h[key] for h in log if key in h and "train_runtime" not in h]  # noqa: E731
    for key in ("loss", "grad_norm", "l2/penalty", "l2/drift"):
        assert logged(run["log"], key) == pytest.approx(logged(single_log, key), rel=1e-5), key
    assert max(logged(run["log"], "grad_norm")) > 0.5  # clipping was active

    # θ₀ split between the ranks, one file each; resuming from them ends where the uninterrupted run did.
    assert sum(run["anchor_per_rank"]) == run["anchored_total"] and max(run["anchor_per_rank"]) < run["anchored_total"]
    assert run["anchor_files"] == ["l2_anchor-rank00000-of-00002.safetensors",
                                   "l2_anchor-rank00001-of-00002.safetensors"]
    assert max_rel_diff(run["resumed_params"], run["params"]) < 1e-6
    assert logged(run["resumed_log"], "l2/penalty")[-1] == pytest.approx(logged(run["log"], "l2/penalty")[-1],
                                                                          rel=1e-5)


# ---- the output anchor (`l2_kl_coef`) under FSDP2 -----------------------------------------------------------------
KL = dict(l2_kl_coef=5.0, l2_kl_temperature=2.0)  # as tests/distributed/fsdp_kl_worker.py trains


@pytest.fixture(scope="module")
def fsdp2_kl_run(tmp_path_factory):
    return launch_fsdp2("fsdp_kl_worker.py", tmp_path_factory.mktemp("fsdp2-kl") / "results.pt")


@pytest.mark.distributed
def test_kl_under_fsdp2_equals_one_process_and_resumes_exactly(fsdp2_kl_run, tmp_path):
    run = fsdp2_kl_run
    assert run["world_size"] == 2 and run["distributed_type"] == "DistributedType.FSDP"
    assert run["param_type"] == "DTensor"

    single, single_log = one_process(tmp_path, "grad", **KL)
    without_kl, _ = one_process(tmp_path, "grad")
    assert max_rel_diff(without_kl, single) > 1e-3  # the KL moves the result far beyond the tolerance below
    assert max_rel_diff(run["params"], single) < 5e-6  # as the weight penalty alone (see above)

    logged = lambda log, key: [h[key] for h in log if key in h and "train_runtime" not in h]  # noqa: E731
    for key in ("loss", "grad_norm", "l2/penalty"):
        assert logged(run["log"], key) == pytest.approx(logged(single_log, key), rel=1e-5), key
    # The KL is quadratic in the logits' small drift from θ₀'s (~1e-2 of them): their last-bit differences weigh
    # ~100 times more in it (1.4e-5 seen). A reference at the wrong θ would be off by its whole value.
    assert logged(run["log"], "l2/kl") == pytest.approx(logged(single_log, "l2/kl"), rel=1e-4, abs=1e-9)
    assert min(logged(run["log"], "l2/kl")[1:]) > 1e-4  # a KL that stayed 0 would not be seen above

    # The KL's own θ₀ (biases, LayerNorms: outside L2-SP) split between the ranks, one file each; a trainer built
    # from another model and resumed from them ends where the uninterrupted run did.
    assert sum(run["own_per_rank"]) == run["own_total"] and max(run["own_per_rank"]) < run["own_total"]
    assert run["kl_files"] == ["l2_kl_anchor-rank00000-of-00002.safetensors",
                               "l2_kl_anchor-rank00001-of-00002.safetensors"]
    assert max_rel_diff(run["resumed_params"], run["params"]) < 1e-6
    assert logged(run["resumed_log"], "l2/kl") == pytest.approx(logged(run["log"], "l2/kl"), rel=1e-5)  # 1–2 saved


@pytest.mark.distributed
def test_kl_reference_forward_under_fsdp2_is_theta0_and_leaves_training_untouched(fsdp2_kl_run):
    """On each rank, mid-training (gradients populated, Adam's state in place), one reference forward."""
    for rank in fsdp2_kl_run["reference"]:
        assert rank["theta_changed"] == [] and rank["grads_changed"] == [] and rank["optimizer_changed"] == 0
        assert rank["same_objects"]  # the optimizer steps the same parameters, in the same storage
        assert rank["all_resharded"] and rank["training_mode"] and not rank["reference_requires_grad"]
        assert rank["start_vs_now"] > 1e-2  # θ and θ₀ predict differently: the two checks below tell them apart
        assert rank["reference_vs_start"] < 1e-5  # θ₀'s logits, as an unsharded copy of the starting model
        assert rank["training_vs_now"] < 1e-5  # and the training forward after it ran on θ again
