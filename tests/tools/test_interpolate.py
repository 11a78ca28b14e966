"""`hf-l2 interpolate`: θ(t) = (1 − t)·θ₀ + t·θ from a finished run, loadable, with tokenizer and card."""

import pytest
import torch
from helpers import TokenDataset, english_text, l2_args, tiny_gpt2
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2LMHeadModel

from hf_l2 import L2Trainer
from hf_l2.saved_state import ANCHOR_FILE, save_anchor
from hf_l2.tools.cli import main
from hf_l2.tools.local_tokenizers import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(english_text()[:200], vocab_size=64, model_max_length=32)


def finished_run(folder, tokenizer, **overrides):
    """A run saved as a user saves it: the model, its tokenizer and the card, in `folder`."""
    model = tiny_gpt2()
    args = l2_args(folder, max_steps=3, learning_rate=0.05, l2_coef=0.1, **overrides)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    trainer.save_model()
    tokenizer.save_pretrained(folder)
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def saved_start(folder):
    tiny_gpt2().save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def test_endpoints_are_exact_and_the_midpoint_is_the_mean(tmp_path, tokenizer):
    finished_run(tmp_path / "run", tokenizer)
    start = saved_start(tmp_path / "base")
    rc = main(["interpolate", str(tmp_path / "run"), "--weight", "0", "--weight", "1", "--weight", "0.5",
               "--output_dir", str(tmp_path / "wise"), "--base_model", str(tmp_path / "base")])
    assert rc == 0
    tuned = load_file(str(tmp_path / "run" / "model.safetensors"))
    at = {t: load_file(str(tmp_path / "wise" / f"weight-{t}" / "model.safetensors")) for t in ("0", "1", "0.5")}
    assert at["1"].keys() == tuned.keys()
    assert any(not torch.equal(tuned[n], start[n]) for n in tuned)  # the run did move
    for n in tuned:
        assert torch.equal(at["0"][n], start[n]), n
        assert torch.equal(at["1"][n], tuned[n]), n
        torch.testing.assert_close(at["0.5"][n], (start[n].double() + tuned[n].double()).div(2).float(),
                                   rtol=0, atol=1e-6)
    folder = tmp_path / "wise" / "weight-0.5"
    model = GPT2LMHeadModel.from_pretrained(folder)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight.detach(),
                               at["0.5"]["transformer.h.0.attn.c_attn.weight"])
    assert AutoTokenizer.from_pretrained(folder)("the file").input_ids == tokenizer("the file").input_ids
    card = (folder / "README.md").read_text()
    assert "t = 0.5" in card and "wise-ft" in card and "the run's anchor file `l2_anchor.safetensors`" in card


def test_an_anchor_holding_every_weight_needs_no_base_model(tmp_path, tokenizer):
    finished_run(tmp_path / "run", tokenizer, l2_exclude_bias_and_norm=False)
    start = {n: p.detach() for n, p in tiny_gpt2().named_parameters()}
    assert main(["interpolate", str(tmp_path / "run"), "--weight", "0", "--output_dir", str(tmp_path / "w")]) == 0
    got = load_file(str(tmp_path / "w" / "weight-0" / "model.safetensors"))
    assert all(torch.equal(got[n], start[n]) for n in start if n in got)


def test_the_anchors_recorded_source_fills_in_what_the_anchor_lacks(tmp_path, tokenizer):
    """A run of a model loaded from a local folder, card gone: the anchor file names that folder, which still
    exists, so the weights the anchor leaves out (biases, norms) come from it."""
    start = saved_start(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    trainer = L2Trainer(model=model, args=l2_args(tmp_path / "run", max_steps=3, learning_rate=0.05, l2_coef=0.1),
                        train_dataset=TokenDataset())
    trainer.train()
    trainer.save_model()
    (tmp_path / "run" / "README.md").unlink()
    assert main(["interpolate", str(tmp_path / "run"), "--weight", "0", "--output_dir", str(tmp_path / "w")]) == 0
    got = load_file(str(tmp_path / "w" / "weight-0" / "model.safetensors"))
    assert all(torch.equal(got[n], start[n]) for n in start)


def test_a_sharded_run_is_merged_from_its_per_rank_anchor_files(tmp_path, tokenizer):
    finished_run(tmp_path / "run", tokenizer, l2_exclude_bias_and_norm=False)
    whole = load_file(str(tmp_path / "run" / ANCHOR_FILE))
    (tmp_path / "run" / ANCHOR_FILE).unlink()
    for rank in (0, 1):  # as FSDP1 leaves them: each rank a contiguous half of each flattened tensor
        pieces, layout = {}, {}
        for name, value in whole.items():
            half = (value.numel() + 1) // 2
            flat = value.reshape(-1)
            pieces[name] = (flat[:half] if rank == 0 else flat[half:]).clone()
            layout[name] = (0 if rank == 0 else half, value.shape)
        save_anchor(pieces, layout, str(tmp_path / "run"), rank, 2)
    assert main(["interpolate", str(tmp_path / "run"), "--weight", "0", "--output_dir", str(tmp_path / "w")]) == 0
    got = load_file(str(tmp_path / "w" / "weight-0" / "model.safetensors"))
    assert all(torch.equal(got[n], whole[n]) for n in whole if n in got)
    (tmp_path / "run" / "l2_anchor-rank00001-of-00002.safetensors").unlink()
    assert main(["interpolate", str(tmp_path / "run"), "--weight", "0", "--output_dir", str(tmp_path / "w")]) == 2


def test_a_lora_run_scales_its_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "run")
    start = base.transformer.h[0].attn.c_attn.weight.detach()

    def delta(adapter_folder):  # the merged model's change of the adapted weight
        merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), adapter_folder)
        return merged.merge_and_unload().transformer.h[0].attn.c_attn.weight.detach() - start

    full = delta(tmp_path / "run")
    assert main(["interpolate", str(tmp_path / "run"), "--weight", "0.25", "--output_dir", str(tmp_path / "w")]) == 0
    torch.testing.assert_close(delta(tmp_path / "w" / "weight-0.25"), 0.25 * full, rtol=1e-5, atol=1e-6)
    assert full.abs().max() > 0


@pytest.mark.parametrize("case", ["extrapolation", "not_a_run", "no_anchor"])
def test_bad_input_gets_one_clear_line(tmp_path, tokenizer, capsys, case):
    if case == "no_anchor":
        finished_run(tmp_path / "run", tokenizer, l2_mode="none")
    elif case == "extrapolation":
        finished_run(tmp_path / "run", tokenizer)
    else:
        (tmp_path / "run").mkdir()
    weight = "1.5" if case == "extrapolation" else "0.5"
    capsys.readouterr()  # the run's own progress bars
    rc = main(["interpolate", str(tmp_path / "run"), "--weight", weight, "--output_dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    expected = {"extrapolation": "--allow_extrapolation", "not_a_run": "is not a saved run",
                "no_anchor": "has no θ₀"}[case]
    assert expected in err[0]
    assert not (tmp_path / "w").exists()


# ---- issue 24, item 10: a base model that does not fit, t that overflows ----------------------------------------
def other_architecture(folder):
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=0,
                          decoder_start_token_id=0, max_position_embeddings=32)
    MarianMTModel(config).save_pretrained(folder)


def wider_gpt2(folder):
    from transformers import GPT2Config

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(folder)


@pytest.mark.parametrize("base", ["other_architecture", "other_shapes"])
def test_a_base_model_that_does_not_fit_the_run_is_refused_before_writing(tmp_path, tokenizer, capsys, base):
    """Before: exit 0, the weights θ₀ lacked (or had in other shapes) written at their fine-tuned values."""
    finished_run(tmp_path / "run", tokenizer)
    (other_architecture if base == "other_architecture" else wider_gpt2)(tmp_path / "base")
    # What θ₀ is, written out: the run's anchor file over the base model's weights.
    tuned = load_file(str(tmp_path / "run" / "model.safetensors"))
    theta0 = load_file(str(tmp_path / "base" / "model.safetensors")) | load_file(str(tmp_path / "run" / ANCHOR_FILE))
    missing = [n for n in tuned if n not in theta0]
    other = [n for n in tuned if n in theta0 and theta0[n].shape != tuned[n].shape]
    assert (missing and not other) if base == "other_architecture" else (other and not missing)
    capsys.readouterr()
    argv = ["interpolate", str(tmp_path / "run"), "--weight", "0.5", "--output_dir", str(tmp_path / "w"),
            "--base_model", str(tmp_path / "base")]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and not (tmp_path / "w").exists()
    if base == "other_architecture":
        assert f"θ₀ lacks {len(missing)} of the run's {len(tuned)} weights, e.g. {missing[:3]}" in err[0]
        assert "--keep_missing" in err[0]
        # Asked for, the weights θ₀ lacks keep their fine-tuned values and the others are blended.
        assert main(argv + ["--keep_missing"]) == 0
        got = load_file(str(tmp_path / "w" / "weight-0.5" / "model.safetensors"))
        assert all(torch.equal(got[n], tuned[n]) for n in missing)
        name = "transformer.h.0.attn.c_attn.weight"
        torch.testing.assert_close(got[name], (tuned[name] + theta0[name]) / 2, rtol=0, atol=1e-6)
    else:
        said = f"θ₀ has another shape for {len(other)} of the run's {len(tuned)} weights, e.g. {other[0]}: run"
        assert said in err[0]


@pytest.mark.parametrize("weights", [["inf"], ["nan"], ["1e39"], ["0.5", "1e37"]])
def test_weights_giving_non_finite_models_are_refused_before_writing(tmp_path, tokenizer, capsys, weights):
    """Before: `--weight inf --allow_extrapolation` wrote inf/NaN weights, exit 0. 1e39 is beyond float32, in which
    θ(t) is computed. 1e37 is not, but one weight moved by 100 gives θ₀ + 1e37·100, beyond it (the first t, 0.5,
    is fine: still nothing may be written)."""
    finished_run(tmp_path / "run", tokenizer)
    saved_start(tmp_path / "base")
    path = str(tmp_path / "run" / "model.safetensors")
    tuned = load_file(path)
    tuned["transformer.h.1.mlp.c_fc.weight"][0, 0] += 100.0
    save_file(tuned, path, metadata={"format": "pt"})
    capsys.readouterr()
    argv = ["interpolate", str(tmp_path / "run"), "--output_dir", str(tmp_path / "w"), "--base_model",
            str(tmp_path / "base"), "--allow_extrapolation"]
    rc = main(argv + [a for t in weights for a in ("--weight", t)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and not (tmp_path / "w").exists()
    expected = ("gives non-finite values in 1 weight(s), e.g. ['transformer.h.1.mlp.c_fc.weight']"
                if weights[-1] == "1e37" else "is not a finite float32 number")
    assert f"--weight {float(weights[-1]):g} {expected}" in err[0]
