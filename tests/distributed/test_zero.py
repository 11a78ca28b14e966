"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo, DeepSpeed's CPU accelerator) against one process.

ZeRO-3 keeps parameters as empty placeholders outside forward: the penalty reads this rank's partitions and
sends ∇Ω through DeepSpeed's own gradient reduction (see hf_l2/zero3.py). Skipped when deepspeed is not
installed (it is an optional extra; see docs/distributed.md for how these tests were run).
"""


import pytest
import torch
from helpers import run_two_processes

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed  # 2 processes under torchrun


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero") / "results.pt"
    run_two_processes("zero_worker.py", str(out), DS_ACCELERATOR="cpu")
    results = torch.load(out, weights_only=False)
    assert results["world"] == 2
    return results


@pytest.mark.parametrize("case", ["zero2-full", "zero3-full", "zero3-pieces"])
def test_zero_training_equals_one_process(zero_runs, case):
    run = zero_runs[case]
    assert run["rel_diff"] < 2e-6  # the same 3 steps without the penalty move 1e-2 away (test_sharded.py)
    for key, value in run["ref_stats"].items():
        assert run["stats"][key] == pytest.approx(value, rel=1e-5), key
    sharded = case.startswith("zero3")
    assert run["sharded"] == sharded
    if sharded:  # each rank keeps its partition of θ₀ only, whether θ₀ was taken before or after partitioning
        assert sum(run["anchor_per_rank"]) == run["anchored_total"]
        assert max(run["anchor_per_rank"]) <= 0.51 * run["anchored_total"]
    else:
        assert run["anchor_per_rank"] == [run["anchored_total"]] * 2
