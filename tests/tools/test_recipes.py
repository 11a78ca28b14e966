"""The recipes end to end, offline: tiny local models and tokenizers, small local data files."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys

import pytest
import torch
from helpers import (
    ROOT,
    RUN,
    gpt2_args,
    marian_args,
    run_distributed,
    translation_pairs,
)
from safetensors.torch import load_file
from transformers import AutoConfig

from hf_l2.tools.recipe_common import RecipeInputError, load_recipe, parse_args

generation = load_recipe("gpt2_generation")
translation = load_recipe("marian_translation")


def read_json(path):
    return json.loads(path.read_text())


def distance(folder_a, folder_b) -> float:
    a, b = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    return math.sqrt(sum((a[k] - b[k]).double().pow(2).sum().item() for k in b))


# ---- generation ---------------------------------------------------------------------------------------------
def test_generation_recipe_writes_every_output(workdir, tmp_path):
    out = tmp_path / "run"
    # 31 prompt tokens + 100 new ones exceed the 64-token context: sampling must stop at the context.
    same_as_validation = ["--pretrain_validation_file", str(workdir["text"]["validation"])]
    argv = gpt2_args(workdir, out, "--l2_mode", "l2_sp", "--l2_coef", "0.1", "--max_new_tokens", "100",
                     *same_as_validation)
    metrics = generation.main(argv)

    results = read_json(out / "all_results.json")
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-6)
    # The pretraining-domain file here is the validation file: the same data must give the same numbers.
    assert results["eval_pretrain_loss"] == pytest.approx(results["eval_loss"], rel=1e-6)
    assert results["eval_pretrain_perplexity"] == pytest.approx(results["eval_perplexity"], rel=1e-6)
    assert results == pytest.approx(metrics)
    assert read_json(out / "train_results.json")["train_samples"] > 0
    assert read_json(out / "eval_results.json")["eval_samples"] > 0
    history = read_json(out / "trainer_state.json")["log_history"]
    assert any("l2/penalty" in h for h in history) and history[-1]["step"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["prompt"] and "generated" in s for s in samples)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # Called from Python (as the sweep and the demo call it), the card's command is the recipe's own command line.
    assert f"python -m hf_l2.recipes.gpt2_generation {shlex.join(argv)}\n" in (out / "README.md").read_text()


def test_a_cpu_run_is_free_of_stock_warnings_the_recipe_can_prevent(workdir, tmp_path):
    """No `pin_memory` warning (no accelerator to pin for) and no 4-bit kernel lookup at import."""
    import warnings

    argv = gpt2_args(workdir, tmp_path, "--num_samples", "0")
    at = argv.index("--use_cpu")
    del argv[at:at + 2]  # as a user on a CPU machine runs it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generation.main(argv)
    assert not [str(w.message) for w in caught if "pin_memory" in str(w.message)]
    imported = subprocess.run([sys.executable, "-c", "import hf_l2"], capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0 and "kernels-community" not in imported.stderr


@pytest.mark.parametrize("train", ["jsonl", "csv"])
def test_generation_recipe_reads_json_and_csv(workdir, tmp_path, train):
    """The jsonl run also has no validation file: 5% of the training data is held out instead."""
    argv = gpt2_args(workdir, tmp_path, "--l2_mode", "l2", train=train)
    if train == "jsonl":
        at = argv.index("--validation_file")
        argv[at:at + 2] = ["--text_column", "content"]
    metrics = generation.main(argv)
    assert math.isfinite(metrics["eval_loss"]) and metrics["train_samples"] > 0
    assert metrics["eval_samples"] > 0


def test_generation_recipe_l2_sp_stays_closer_to_the_pretrained_model(workdir, tmp_path):
    """The point of L2-SP, measured on the saved weights: a strong pull ends nearer θ₀ than no penalty."""
    far = generation.main(gpt2_args(workdir, tmp_path / "none", "--l2_mode", "none", "--num_samples", "0"))
    near = generation.main(gpt2_args(workdir, tmp_path / "sp", "--l2_mode", "l2_sp", "--l2_coef", "100",
                                     "--num_samples", "0"))
    assert "l2/penalty" not in json.dumps(read_json(tmp_path / "none" / "trainer_state.json"))
    assert distance(tmp_path / "sp", workdir["gpt2"]) < 0.5 * distance(tmp_path / "none", workdir["gpt2"])
    assert math.isfinite(far["eval_loss"]) and math.isfinite(near["eval_loss"])


def test_generation_recipe_fisher_from_a_fisher_file(workdir, tmp_path):
    generation.main(gpt2_args(workdir, tmp_path / "f", "--l2_mode", "l2_sp_fisher", "--l2_coef", "1",
                              "--fisher_file", str(workdir["text"]["validation"]), "--l2_fisher_samples", "3",
                              "--num_samples", "0"))
    assert (tmp_path / "f" / "l2_fisher.safetensors").is_file()
    card = (tmp_path / "f" / "README.md").read_text()
    assert "over 3 examples of `valid.txt`" in card
    penalties = [h["l2/penalty"] for h in read_json(tmp_path / "f" / "trainer_state.json")["log_history"]
                 if "l2/penalty" in h]
    assert penalties and penalties[-1] > 0


def test_sweep_takes_the_fisher_mode():
    from hf_l2.tools.sweep import grid
    from hf_l2.tools.sweep_report import COLORS

    settings = grid(["none", "l2_sp", "l2_sp_fisher"], [0.1, 1.0])
    assert [s.label for s in settings] == ["none", "l2_sp α=0.1", "l2_sp α=1", "l2_sp_fisher α=0.1",
                                           "l2_sp_fisher α=1"]
    assert all(s.mode in COLORS for s in settings)


# ---- translation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_translation_recipe_reports_bleu_chrf_and_writes_triples(workdir, tmp_path, layout):
    columns = ["--source_column", "english", "--target_column", "german"] if layout == "csv" else []
    mode = ["--l2_mode", "l2_sp", "--l2_coef", "0.1"] if layout == "jsonl" else ["--l2_mode", "none"]
    # The held-out pairs again as the pretraining domain, in the `translation` layout even for the csv run.
    metrics = translation.main(marian_args(workdir, tmp_path, *mode, *columns, "--pretrain_validation_file",
                                           str(workdir["pairs"]["validation"]), layout=layout))

    for key in ("eval_bleu", "eval_chrf"):
        assert 0.0 <= metrics[key] <= 100.0
        assert metrics[key.replace("eval_", "eval_pretrain_")] == pytest.approx(metrics[key])  # same data
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
    assert metrics["eval_pretrain_perplexity"] == pytest.approx(metrics["eval_perplexity"], rel=1e-6)
    assert metrics["eval_samples"] == 12
    triples = [json.loads(line) for line in (tmp_path / "translations.jsonl").read_text().splitlines()]
    held_out = dict(translation_pairs())
    assert len(triples) == 3 and all(held_out[t["source"]] == t["reference"] for t in triples)
    history = read_json(tmp_path / "trainer_state.json")["log_history"]
    assert any("l2/drift" in h for h in history) == (layout == "jsonl")


def test_translation_evaluation_generates_up_to_max_target_length(workdir, tmp_path):
    """The evaluations during training generate as long as `--max_target_length`, not the model's own
    `generation_config.max_length` (here 3: at most 2 tokens after the start token)."""
    import shutil

    from transformers import GenerationConfig

    model = tmp_path / "short-generation"
    shutil.copytree(workdir["marian"], model)
    config = GenerationConfig.from_pretrained(model)
    config.max_length = 3
    config.save_pretrained(model)
    argv = marian_args(workdir, tmp_path / "run", "--eval_strategy", "steps", "--eval_steps", "2", "--num_samples",
                       "0", "--max_target_length", "12")
    argv[argv.index("--model_name_or_path") + 1] = str(model)
    translation.main(argv)
    history = read_json(tmp_path / "run" / "trainer_state.json")["log_history"]
    during_training = [h["eval_gen_len"] for h in history if "eval_gen_len" in h and h["step"] < 4]
    assert during_training and max(during_training) > 2


def test_translation_chrf_is_perfect_on_copied_references(workdir):
    """compute_metrics decodes ids the way the recipe does: references fed back as predictions score 100."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir["marian"])
    targets = [t for _, t in translation_pairs()[:6]]
    ids = tokenizer(text_target=targets, padding=True, return_tensors="np")["input_ids"]
    labels = ids.copy()
    labels[ids == tokenizer.pad_token_id] = -100
    scores = translation.bleu_and_chrf(tokenizer)((ids, labels))
    assert scores["chrf"] == pytest.approx(100.0) and scores["bleu"] == pytest.approx(100.0)


# ---- configuration files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["gpt2_generation", "marian_translation"])
def test_shipped_config_files_parse(recipe):
    module = generation if recipe == "gpt2_generation" else translation
    types = {
        "gpt2_generation": (generation.GenerationModelArguments, generation.GenerationDataArguments),
        "marian_translation": (translation.TranslationModelArguments, translation.TranslationDataArguments),
    }[recipe]
    config = module.L2Seq2SeqConfig if recipe == "marian_translation" else module.L2Config
    parsed = parse_args((*types, config), module.DEFAULTS, [str(ROOT / "recipes" / "configs" / f"{recipe}.yaml")])
    assert parsed[-1].l2_mode == "l2_sp" and parsed[-1].do_train


def test_config_file_overrides_recipe_defaults(workdir, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({
        "model_name_or_path": str(workdir["gpt2"]), "train_file": str(workdir["text"]["txt"]),
        "output_dir": str(tmp_path / "out"), "do_eval": False, "l2_coef": 0.5, "l2_mode": "l2",
    }))
    model_args, data_args, args = parse_args(
        (generation.GenerationModelArguments, generation.GenerationDataArguments, generation.L2Config),
        generation.DEFAULTS, [str(path)],
    )
    assert (args.do_train, args.do_eval, args.l2_coef, args.l2_mode) == (True, False, 0.5, "l2")
    assert data_args.train_file == str(workdir["text"]["txt"])


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_get_clear_errors(workdir, tmp_path):
    # jsonl training data (column `content`, validation carved from it) with a .txt pretraining-domain file
    mixed = gpt2_args(workdir, tmp_path, "--text_column", "content", "--pretrain_validation_file",
                      str(workdir["text"]["validation"]), train="jsonl")
    del mixed[mixed.index("--validation_file"):mixed.index("--validation_file") + 2]
    cases = [
        (generation, gpt2_args(workdir, tmp_path) + ["--train_file", str(tmp_path / "nope.txt")],
         r"--train_file.*nope\.txt.*does not exist"),
        (generation, gpt2_args(workdir, tmp_path, "--text_column", "body", train="jsonl"),
         r"--text_column body` is not in `--train_file` .*train\.jsonl; its columns: \['content'\]"),
        (generation, gpt2_args(workdir, tmp_path, "--block_size", "128"), r"--block_size 128.*context of 64"),
        (generation, gpt2_args(workdir, tmp_path, "--model_name_or_path", str(workdir["marian"])),
         r"encoder-decoder.*Use python -m hf_l2\.recipes\.marian_translation instead"),
        (translation, marian_args(workdir, tmp_path, "--model_name_or_path", str(workdir["gpt2"])),
         r"decoder-only.*Use python -m hf_l2\.recipes\.gpt2_generation instead"),
        (translation, marian_args(workdir, tmp_path, "--target_lang", "fr"), r"keys \['de', 'en'\], not \['fr'\]"),
        (translation, marian_args(workdir, tmp_path, layout="csv"), r"no column \['en', 'de'\].*--source_column"),
        (generation, mixed,
         r"--text_column content` is not in `--pretrain_validation_file` .*valid\.txt; its columns: \['text'\]"),
        (translation, marian_args(workdir, tmp_path, "--pretrain_validation_file",
                                  str(workdir["pairs"]["validation_csv"])),
         r"`--pretrain_validation_file` .*validation\.csv has no column \['en', 'de'\]"),
        (generation, gpt2_args(workdir, tmp_path, "--pretrain_validation_file", str(tmp_path / "gone.txt")),
         r"--pretrain_validation_file.*gone\.txt.*does not exist"),
    ]
    for recipe, argv, message in cases:
        with pytest.raises(RecipeInputError, match=message):
            recipe.main(argv)


def test_command_line_error_is_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "gpt2_generation.py"), "--train_file", str(tmp_path / "missing.txt"),
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert result.returncode != 0
    assert "error: `--train_file`" in result.stderr and "Traceback" not in result.stderr


# ---- several processes --------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_generation_recipe_under_accelerate_launch_with_two_processes(workdir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 ... --use_cpu true` runs 2 gloo processes on a CPU.

    (`--cpu --num_processes 2` starts a single process in accelerate 1.15.) Two processes see each batch once
    between them, so one epoch takes half the optimizer steps: that proves the world size was 2.
    """
    out = tmp_path / "ddp"
    argv = gpt2_args(workdir, out, "--l2_mode", "l2_sp", "--l2_coef", "0.1", "--num_samples", "1")
    argv[argv.index("--max_steps") + 1] = "-1"
    argv += ["--num_train_epochs", "1", "--max_train_samples", "16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run_distributed(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         str(ROOT / "recipes" / "gpt2_generation.py"), *argv],
        env,
    )
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 16 // (4 * 2)  # 16 blocks, 4 per process, 2 processes
    assert any("l2/penalty" in h for h in state["log_history"])
    assert (out / "samples.jsonl").read_text().count("\n") == 1
    assert AutoConfig.from_pretrained(out).n_positions == 64
    assert torch.isfinite(torch.tensor(read_json(out / "all_results.json")["eval_loss"]))
    # The card's command is the launch as typed: replayed, it starts 2 processes again.
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              str(ROOT / "recipes" / "gpt2_generation.py"), *argv]
    assert f"{shlex.join(launch)}\n" in (out / "README.md").read_text()


def test_interpolate_eval_scores_each_weight_as_the_recipe_scores_the_two_ends(workdir, tmp_path, capsys):
    """t = 1 is the run itself and t = 0 its start: their rows equal the recipe's own evaluations of those models."""
    from hf_l2.tools.cli import main

    data = ["--train_file", str(workdir["text"]["txt"]), "--validation_file", str(workdir["text"]["validation"]),
            "--cache_dir", str(workdir["cache"]), "--block_size", "32", "--num_samples", "0", *RUN]
    tuned = generation.main(gpt2_args(workdir, tmp_path / "run", "--l2_mode", "l2_sp", "--l2_coef", "0.1",
                                      "--num_samples", "0"))
    start = generation.main(["--model_name_or_path", str(workdir["gpt2"]), "--do_train", "false",
                             "--output_dir", str(tmp_path / "start"), *data])
    assert main(["interpolate", str(tmp_path / "run"), "--weight", "0", "--weight", "0.5", "--weight", "1",
                 "--output_dir", str(tmp_path / "wise"), "--base_model", str(workdir["gpt2"]), "--eval",
                 "gpt2_generation", "--", *data]) == 0
    rows = {r["coef"]: r for r in map(json.loads, (tmp_path / "wise" / "results.jsonl").read_text().splitlines())}
    assert rows[0.0]["eval_loss"] == pytest.approx(start["eval_loss"], rel=1e-6)
    assert rows[1.0]["eval_loss"] == pytest.approx(tuned["eval_loss"], rel=1e-6)
    assert rows[0.0]["drift"] == 0 and rows[0.5]["drift"] == pytest.approx(rows[1.0]["drift"] / 2, rel=1e-5)
    assert "| wise_ft t=0.5 | 1 |" in capsys.readouterr().out and (tmp_path / "wise" / "results.png").is_file()
    # The model folders hold only the model (they may be pushed); the evaluations are beside them.
    assert not {"eval", "eval.log"} & set(os.listdir(tmp_path / "wise" / "weight-0.5"))
    assert (tmp_path / "wise" / "eval" / "weight-0.5" / "eval.log").is_file()
    # An evaluation trains nothing: no card claiming a fine-tuning, no one-point training plot.
    assert not {"README.md", "l2_training.png"} & set(os.listdir(tmp_path / "wise" / "eval" / "weight-0.5"))
    # The card of each t reproduces it with the base model it was given.
    card = (tmp_path / "wise" / "weight-0.5" / "README.md").read_text()
    assert f"--weight 0.5 --output_dir {tmp_path / 'wise'} --base_model {workdir['gpt2']}" in card
    # What cannot be evaluated is refused before anything is written.
    for extra, message in [(["--eval", "no_such_recipe"], "Recipe 'no_such_recipe' not found"),
                           (["--eval", "gpt2_generation", "--", "--model_name_or_path", "x"],
                            "sets --model_name_or_path"),
                           (["--", "--train_file", "x"], "only for --eval")]:
        assert main(["interpolate", str(tmp_path / "run"), "--weight", "0.5", "--output_dir",
                     str(tmp_path / "refused"), *extra]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_wise_ft_of_an_unpenalized_run_from_a_local_model_needs_no_base_model(workdir, tmp_path):
    """`l2_mode none` keeps no θ₀: its card records where the run started, and interpolate reads it there."""
    from huggingface_hub import ModelCard

    from hf_l2.tools.cli import main

    generation.main(gpt2_args(workdir, tmp_path / "run", "--l2_mode", "none", "--num_samples", "0"))
    assert ModelCard.load(tmp_path / "run" / "README.md").data.to_dict()["base_model_path"] == str(workdir["gpt2"])
    assert main(["interpolate", str(tmp_path / "run"), "--weight", "0", "--output_dir", str(tmp_path / "wise")]) == 0
    start = load_file(workdir["gpt2"] / "model.safetensors")
    got = load_file(tmp_path / "wise" / "weight-0" / "model.safetensors")
    assert all(torch.equal(got[name], start[name]) for name in start)
