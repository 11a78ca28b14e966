"""The penalty on sharded parameters: FSDP2 (`fully_shard`, DTensor shards) and FSDP1 (`use_orig_params` views).

The Trainer does not engage FSDP on CPU (accelerate turns FSDP on for accelerator backends only), so this drives
the shard-level code directly: 2 gloo processes, each with its shards and half the global batch, against one
unsharded model trained on the whole batch in the same processes.
"""


import pytest
import torch
from helpers import run_two_processes

from hf_l2.saved_state import load_anchor, save_anchor

CASES = [f"{how}-{impl}" for how in ("fsdp2", "fsdp1") for impl in ("grad", "loss")]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "results.pt"
    run_two_processes("shard_worker.py", str(out))
    results = torch.load(out, weights_only=False)
    assert results["world"] == 2
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_sharded_training_equals_one_process(sharded_runs, case):
    run = sharded_runs[case]
    assert run["penalty_effect"] > 1e-3  # the penalty changes the result by far more than the tolerance below
    assert run["rel_diff"] < 2e-6
    for reference, sharded in run["norms"]:  # clipping (max 0.5) saw the same gradient, ∇Ω included
        assert sharded == pytest.approx(reference, rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_statistics_are_global_and_anchor_is_split(sharded_runs, case):
    run = sharded_runs[case]
    for key, value in run["ref_stats"].items():
        assert run["stats"][key] == pytest.approx(value, rel=1e-5), key
        assert run["resumed_stats"][key] == pytest.approx(value, rel=1e-5), key  # θ₀ restored from rank files
    assert run["value"] == pytest.approx(run["ref_value"], rel=1e-5)  # the ranks' shares add up to Ω
    assert run["groups"].keys() == run["ref_groups"].keys()  # the model card's drift per group: global too
    for group, sums in run["ref_groups"].items():
        assert run["groups"][group] == pytest.approx(sums, rel=1e-5), group
    assert sum(run["anchor_per_rank"]) == run["anchored_total"]  # each value of θ₀ is kept on exactly one rank
    assert max(run["anchor_per_rank"]) <= 0.51 * run["anchored_total"]
    assert run["weight_norms"].keys() == run["ref_weight_norms"].keys()
    for key, value in run["ref_weight_norms"].items():  # WeightNormCallback: global too
        assert run["weight_norms"][key] == pytest.approx(value, rel=1e-5), key
    assert run["files"] == ["l2_anchor-rank00000-of-00002.safetensors", "l2_anchor-rank00001-of-00002.safetensors"]


def test_rank_files_from_another_world_size_are_refused(tmp_path):
    save_anchor({"w": torch.ones(2)}, {"w": (2, torch.Size([4]))}, str(tmp_path), rank=1, world=2)
    tensors, layout = load_anchor(str(tmp_path), rank=1, world=2)
    assert layout == {"w": (2, torch.Size([4]))} and torch.equal(tensors["w"], torch.ones(2))
    with pytest.raises(ValueError, match="same number of processes"):
        load_anchor(str(tmp_path), rank=0, world=4)


def test_a_resized_embeddings_shard_is_cut_against_the_anchor_rows():
    """Rows 3–5 of a 6-row embedding on this rank, θ₀ with 4 rows: row 3 is anchored, rows 4–5 are new."""
    from hf_l2.penalty import L2Penalty
    from hf_l2.sharding import Piece

    full = torch.arange(12.0).reshape(6, 2)
    anchor = full[:4] - 1.0
    shard = torch.nn.Parameter(full[3:].clone())
    penalty = L2Penalty(2.0, 0.5, ["emb"], [], {"emb": anchor.clone()})
    penalty.bind({"emb": Piece(shard, start=6, shape=torch.Size([6, 2]), replicas=1)})
    expected = 1.0 * (full[3] - anchor[3]).pow(2).sum() + 0.25 * full[4:].pow(2).sum()
    assert penalty.value().item() == pytest.approx(expected.item())
    assert penalty.anchors["emb"].shape == (1, 2)  # only this rank's row of θ₀ is kept
    assert penalty.anchor_layout["emb"] == (6, torch.Size([4, 2]))
    penalty.add_to_grads_()
    torch.testing.assert_close(shard.grad, torch.cat([2.0 * (full[3:4] - anchor[3:4]), 0.5 * full[4:]]))


def test_an_anchor_taken_on_the_meta_device_is_taken_again_at_bind():
    """FSDP's cpu_ram_efficient_loading leaves ranks > 0 on the meta device until `prepare` loads the weights."""
    from hf_l2.penalty import L2Penalty, snapshot

    on_meta = {"w": torch.nn.Parameter(torch.empty(3, 2, device="meta"))}
    anchors = snapshot(on_meta, ["w"], torch.bfloat16, "cpu")
    assert anchors["w"].is_meta
    loaded = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))  # the weights `prepare` put in place
    penalty = L2Penalty(1.0, 0.0, ["w"], [], anchors, anchors_on_cpu=True)
    penalty.bind({"w": loaded})
    assert penalty.anchors["w"].dtype == torch.bfloat16 and not penalty.anchors["w"].is_meta
    torch.testing.assert_close(penalty.anchors["w"].float(), loaded.detach())
    assert penalty.value().item() == 0.0
