"""The recipes as a careless or unlucky user drives them: reruns after a crash, checkpoints cut short by a kill,
config files as PyYAML reads them, messy data files, damaged θ₀ files. Each mistake ends in one line naming the
file or field (before training), and no run is lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from helpers import ROOT, TokenDataset, l2_args, tiny_gpt2
from test_recipes import generation, gpt2_args, marian_args, translation, workdir  # noqa: F401 - a fixture

from hf_l2 import L2Trainer
from hf_l2.saved_state import ANCHOR_FILE, KL_ANCHOR_FILES, RANK_ANCHOR_FILE, load_anchor, save_anchor
from hf_l2.tools.recipe_common import RecipeInputError, parse_args
from hf_l2.tools.saved_folders import missing_from_checkpoint

SAVING = ["--save_strategy", "steps", "--save_steps", "2", "--l2_mode", "l2_sp", "--l2_coef", "0.1",
          "--num_samples", "0", "--do_eval", "false"]


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def count_steps(monkeypatch):
    """How many optimizer steps (GA 1: training_step calls) the recipe runs in this process."""
    calls = []
    original = generation.L2Trainer.training_step

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(generation.L2Trainer, "training_step", counted)
    return calls


@pytest.fixture(scope="module")
def crashed_run(workdir, tmp_path_factory):  # noqa: F811
    """A run "killed" after step 4 of 6: checkpoint-2 and checkpoint-4 saved, the final save never reached."""
    out = tmp_path_factory.mktemp("crashed") / "run"
    generation.main(gpt2_args(workdir, out, *SAVING))
    for name in os.listdir(out):
        if not name.startswith("checkpoint-"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    return out


def copy_of(crashed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(crashed_run, out)
    return out


# ---- 6. a rerun in a folder holding checkpoints ---------------------------------------------------------------
@pytest.mark.parametrize("resume", [[], ["--resume_from_checkpoint", "true"]])
def test_a_rerun_resumes_from_the_latest_checkpoint(workdir, crashed_run, tmp_path, capsys, count_steps, resume):  # noqa: F811
    out = copy_of(crashed_run, tmp_path)
    argv = gpt2_args(workdir, out, *SAVING, *resume)
    argv[argv.index("--max_steps") + 1] = "6"
    generation.main(argv)
    assert f"Resuming from {out / 'checkpoint-4'}" in capsys.readouterr().out
    assert count_steps == [4, 5]  # only the two steps the crashed run had not done
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_overwrite_output_dir_deletes_the_old_checkpoints_and_starts_afresh(workdir, crashed_run, tmp_path, capsys,  # noqa: F811
                                                                            count_steps):
    out = copy_of(crashed_run, tmp_path)
    stale = out / "checkpoint-4" / "optimizer.pt"
    generation.main(gpt2_args(workdir, out, *SAVING, "--max_steps", "2", "--overwrite_output_dir", "true"))
    assert "deleted 2 checkpoint(s) of an earlier run" in capsys.readouterr().out
    assert count_steps == [0, 1]
    assert not stale.exists() and sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2"]


def test_resume_true_without_checkpoints_is_refused(workdir, tmp_path):  # noqa: F811
    with pytest.raises(RecipeInputError, match=r"--resume_from_checkpoint true`: .* holds no checkpoint-N folder"):
        generation.main(gpt2_args(workdir, tmp_path / "fresh", "--resume_from_checkpoint", "true"))


def test_resume_false_in_a_folder_with_checkpoints_is_refused(workdir, crashed_run, tmp_path):  # noqa: F811
    out = copy_of(crashed_run, tmp_path)
    with pytest.raises(RecipeInputError, match=r"--resume_from_checkpoint false`, but .* holds checkpoints of an "
                                               r"earlier run: pass `--overwrite_output_dir true`"):
        generation.main(gpt2_args(workdir, out, "--resume_from_checkpoint", "false"))
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]


# ---- 7. checkpoints cut short by a kill -----------------------------------------------------------------------
def test_latest_checkpoint_selection_skips_an_incomplete_one(workdir, crashed_run, tmp_path, capsys, count_steps):  # noqa: F811
    out = copy_of(crashed_run, tmp_path)
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # the Trainer writes it last
    argv = gpt2_args(workdir, out, *SAVING, "--max_steps", "6")
    generation.main(argv)
    said = capsys.readouterr().out
    assert f"Skipping the incomplete checkpoint {out / 'checkpoint-4'}: it lacks trainer_state.json (missing)" in said
    assert f"Resuming from {out / 'checkpoint-2'}" in said
    assert count_steps == [2, 3, 4, 5]


def test_an_explicit_incomplete_checkpoint_gets_one_line_listing_what_is_missing(workdir, crashed_run, tmp_path):  # noqa: F811
    out = copy_of(crashed_run, tmp_path)
    checkpoint = out / "checkpoint-4"
    (checkpoint / "optimizer.pt").unlink()
    truncate(checkpoint / ANCHOR_FILE)
    argv = gpt2_args(workdir, out, *SAVING, "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(RecipeInputError) as caught:
        generation.main(argv)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"`--resume_from_checkpoint {checkpoint}` is incomplete")
    assert "optimizer.pt (missing)" in message and f"{ANCHOR_FILE} (unreadable, truncated" in message
    assert "scheduler.pt" not in message and "trainer_state.json" not in message


def test_what_a_complete_checkpoint_holds_depends_on_the_save_settings(crashed_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(crashed_run / "checkpoint-4", checkpoint)
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True) == []
    # With the output anchor (`l2_kl_coef`), also the KL's θ₀ file (the run had none).
    assert missing_from_checkpoint(str(checkpoint), l2_kl=True) == [f"{KL_ANCHOR_FILES[0]} (missing)"]
    save_anchor({"w": torch.zeros(2)}, {}, str(checkpoint), files=KL_ANCHOR_FILES)
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True, l2_kl=True) == []
    truncate(checkpoint / KL_ANCHOR_FILES[0])
    assert missing_from_checkpoint(str(checkpoint), l2_kl=True)[0].startswith(f"{KL_ANCHOR_FILES[0]} (unreadable")
    truncate(checkpoint / "trainer_state.json")
    assert missing_from_checkpoint(str(checkpoint))[0].startswith("trainer_state.json (unreadable JSON")
    (checkpoint / ANCHOR_FILE).unlink()
    (checkpoint / "scheduler.pt").unlink()
    (checkpoint / "trainer_state.json").write_text("{}")
    assert missing_from_checkpoint(str(checkpoint), l2_sp=False) == ["scheduler.pt (missing)"]
    assert missing_from_checkpoint(str(checkpoint), save_only_model=True, l2_sp=True) == []  # weights + state only
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True) == ["scheduler.pt (missing)",
                                                                     f"{ANCHOR_FILE} (missing)"]
    truncate(checkpoint / "model.safetensors", 0.9)
    assert missing_from_checkpoint(str(checkpoint), save_only_model=True)[0].startswith(
        "model.safetensors (unreadable, truncated")
    # A sharded run saves θ₀ as one file per rank: one of two is not enough.
    save_anchor({"w": torch.zeros(2)}, {}, str(checkpoint), rank=0, world=2)
    assert missing_from_checkpoint(str(checkpoint), save_only_model=False, l2_sp=True)[-1] == (
        f"{RANK_ANCHOR_FILE.format(rank=1, world=2)} (missing)")


def test_an_l2_sp_fisher_checkpoint_is_complete_only_with_its_fisher(crashed_run, tmp_path):
    from hf_l2.saved_state import FISHER_FILE, RANK_FISHER_FILE

    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(crashed_run / "checkpoint-4", checkpoint)
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True, fisher=True) == [f"{FISHER_FILE} (missing)"]
    save_anchor({"w": torch.ones(2)}, {}, str(checkpoint), files=(FISHER_FILE, RANK_FISHER_FILE))
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True, fisher=True) == []
    (checkpoint / FISHER_FILE).unlink()
    save_anchor({"w": torch.ones(2)}, {}, str(checkpoint), rank=1, world=2, files=(FISHER_FILE, RANK_FISHER_FILE))
    assert missing_from_checkpoint(str(checkpoint), l2_sp=True, fisher=True) == [
        f"{RANK_FISHER_FILE.format(rank=0, world=2)} (missing)"]


def test_an_l2_sp_fisher_rerun_skips_a_checkpoint_without_its_fisher(workdir, crashed_run, tmp_path, capsys):  # noqa: F811
    """Resuming from a checkpoint without F would compute F again at the checkpoint's weights, not at θ₀."""
    from safetensors.torch import load_file

    from hf_l2.saved_state import FISHER_FILES

    out = copy_of(crashed_run, tmp_path)
    anchor = load_file(str(out / "checkpoint-2" / ANCHOR_FILE))
    save_anchor({n: torch.ones_like(t) for n, t in anchor.items()}, {}, str(out / "checkpoint-2"), files=FISHER_FILES)
    argv = gpt2_args(workdir, out, *SAVING, "--l2_mode", "l2_sp_fisher")
    argv[argv.index("--max_steps") + 1] = "6"
    generation.main(argv)
    said = capsys.readouterr().out
    assert f"Skipping the incomplete checkpoint {out / 'checkpoint-4'}: it lacks {FISHER_FILES[0]} (missing)" in said
    assert f"Resuming from {out / 'checkpoint-2'}" in said


# ---- 9. config files --------------------------------------------------------------------------------------
def parse_config(tmp_path, workdir, text: str):  # noqa: F811
    path = tmp_path / "run.yaml"
    path.write_text(f"model_name_or_path: {workdir['gpt2']}\ntrain_file: {workdir['text']['txt']}\n"
                    f"output_dir: {tmp_path / 'out'}\n{text}")
    types = (generation.GenerationModelArguments, generation.GenerationDataArguments, generation.L2Config)
    return parse_args(types, generation.DEFAULTS, [str(path)]), path


def test_config_file_numbers_arrive_as_the_command_line_gives_them(tmp_path, workdir):  # noqa: F811
    (_, data_args, args), _ = parse_config(
        tmp_path, workdir, "learning_rate: 1e-3\nl2_coef: 1e-3\nblock_size: '32'\nmax_steps: 7\nwarmup_steps: 1e1\n"
        "l2_exclude: [wte]\nl2_exclude_bias_and_norm: 'false'\n")
    cli = generation.L2Config(output_dir=str(tmp_path / "out"), learning_rate=float("1e-3"), l2_coef=0.001,
                              max_steps=7, warmup_steps=10.0, l2_exclude=["wte"], l2_exclude_bias_and_norm=False)
    for name in ("learning_rate", "l2_coef", "max_steps", "warmup_steps", "l2_exclude", "l2_exclude_bias_and_norm"):
        assert getattr(args, name) == getattr(cli, name) and type(getattr(args, name)) is type(getattr(cli, name))
    assert data_args.block_size == 32


@pytest.mark.parametrize("text, said", [
    ("l2_coef: true", "`l2_coef` must be a number, got the boolean True."),
    ("block_size: '32x'", "`block_size` must be a whole number, got '32x' (str)."),
    ("l2_exclude: [1, 2]", "`l2_exclude[0]` must be text, got 1 (int): put it in quotes."),
    ("learning_rate: 1e-3x", "`learning_rate` must be a number, got '1e-3x' (str)."),
    ("do_train: maybe", "`do_train` must be true or false, got 'maybe' (str)."),
    ("l2_mode: l3", "`l2_mode`='l3' is not one of"),
    ("l2_coeff: 0.1", "unknown key: l2_coeff; did you mean `l2_coef`?"),
])
def test_config_file_mistakes_get_one_line_naming_the_file_and_field(tmp_path, workdir, text, said):  # noqa: F811
    with pytest.raises(RecipeInputError) as caught:
        parse_config(tmp_path, workdir, text + "\n")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'run.yaml'}: ") and said in message and "\n" not in message


def test_config_file_and_command_line_flags_are_merged(tmp_path, workdir):  # noqa: F811
    """`recipe cfg.yaml --max_steps 3`: the file's values, with the flags after it on top (as TRL's `--config`)."""
    path = tmp_path / "run.yaml"
    path.write_text(f"model_name_or_path: {workdir['gpt2']}\ntrain_file: {workdir['text']['txt']}\n"
                    f"output_dir: {tmp_path / 'out'}\nmax_steps: 7\nl2_coef: 0.5\nblock_size: 16\n")
    types = (generation.GenerationModelArguments, generation.GenerationDataArguments, generation.L2Config)
    model_args, data_args, args = parse_args(types, generation.DEFAULTS, [str(path), "--max_steps", "3",
                                                                         "--block_size=8"])
    assert (args.max_steps, data_args.block_size) == (3, 8)  # the command line wins
    assert args.l2_coef == 0.5 and data_args.train_file == str(workdir["text"]["txt"])  # the rest is the file's
    assert model_args.model_name_or_path == str(workdir["gpt2"]) and args.do_train and args.do_eval


@pytest.mark.parametrize("flags, said", [
    (["--l2_cof", "0.1"], "unknown argument: --l2_cof 0.1; did you mean `--l2_coef`?"),
    (["--leraning_rate=1e-3"], "unknown argument: --leraning_rate=1e-3; did you mean `--learning_rate`?"),
])
def test_a_misspelled_recipe_flag_names_the_nearest_valid_one(workdir, tmp_path, flags, said):  # noqa: F811
    with pytest.raises(RecipeInputError) as caught:
        generation.main(gpt2_args(workdir, tmp_path / "out", *flags))
    assert str(caught.value) == said
    assert not (tmp_path / "out").exists()


def test_a_misspelled_hf_l2_flag_names_the_nearest_valid_one(tmp_path, capsys):
    from hf_l2.tools.cli import main

    with pytest.raises(SystemExit) as caught:  # --weight is required: argparse alone would say it is missing
        main(["interpolate", str(tmp_path), "--weigth", "0.5", "--output_dir", str(tmp_path / "w")])
    assert caught.value.code == 2
    assert "unknown argument: --weigth; did you mean `--weight`?" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, flag", [("translation", "--predict_with_generate"), ("generation", "--do_train"),
                                          ("generation", "--do_eval")])
def test_help_shows_the_defaults_the_recipe_sets(recipe, flag, capsys):
    module = {"translation": translation, "generation": generation}[recipe]
    with pytest.raises(SystemExit):
        module.main(["--help"])
    entry = re.search(rf"^  {flag} \[.*?(?=^  -)", capsys.readouterr().out, re.MULTILINE | re.DOTALL).group()
    assert "(default: True)" in " ".join(entry.split()), entry


# ---- 10. data files ----------------------------------------------------------------------------------------
def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.mark.parametrize("name, content, said", [
    ("empty.txt", b"", "the file is empty"),
    ("latin1.txt", "first line\nsecond Zeile f\u00fcr\n".encode("latin-1"),
     "line 2 is not UTF-8 text (byte 0xfc at column 15); save the file as UTF-8."),
    ("broken.jsonl", lines({"content": "a"}, '{"content": "b"', {"content": "c"}).encode(),
     "line 2 is not valid JSON"),
    ("listed.jsonl", lines({"content": "a"}, [1, 2]).encode(), "line 2 is a JSON list, not an object"),
    ("holes.jsonl", lines({"content": "a"}, {"content": "b"}, {"other": "c"}, {"content": None}).encode(),
     "the text (`content`) is missing or null in 2 row(s) (row 3, 4)"),
    ("numbers.jsonl", lines({"content": "a"}, {"content": 7}).encode(), "the text (`content`) is not text (e.g. 7)"),
])
def test_generation_data_mistakes_name_the_file_the_row_and_the_problem(workdir, tmp_path, name, content, said):  # noqa: F811
    if name == "holes.jsonl" and int(datasets.__version__.split(".")[0]) < 5:
        # datasets 4 stops at the row without the key (KeyError) before hf_l2 sees the rows: the one line then
        # names the file but not the row.
        said = "could not be read as json data (KeyError: 'content')"
    path = tmp_path / name
    path.write_bytes(content)
    argv = gpt2_args(workdir, tmp_path / "out", "--text_column", "content")
    argv[argv.index("--train_file") + 1] = str(path)
    with pytest.raises(RecipeInputError) as caught:
        generation.main(argv)
    message = str(caught.value)
    assert message.startswith(f"`--train_file` {path}: ") and said in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def pair(en, de=...):
    return {"translation": {"en": en} if de is ... else {"en": en, "de": de}}


@pytest.mark.parametrize("rows, said", [
    # Row 1 lacks the target: the data still has `de` keys, and the message points at the row, not at the keys.
    ([pair("a"), pair("b", "B"), pair("c", "C")],
     "the text of `translation.de` is missing or null in 1 row(s) (row 1)"),
    ([pair("a", "A"), pair("b", None), pair("c", "C"), pair("d", "")],
     "the text of `translation.de` is missing or null in 1 row(s) (row 2)"),
    ([pair("a", "A"), pair("b", " "), pair("c", "C"), pair("d", "")],
     "the text of `translation.de` is empty in 2 row(s) (row 2, 4)"),
    ([pair("a", "A"), {"translation": None}], "the text of `translation.en` is missing or null in 1 row(s) (row 2)"),
])
def test_translation_pairs_are_checked_on_every_row(workdir, tmp_path, rows, said):  # noqa: F811
    path = tmp_path / "pairs.jsonl"
    path.write_text(lines(*rows))
    argv = marian_args(workdir, tmp_path / "out")
    argv[argv.index("--validation_file") + 1] = str(path)
    with pytest.raises(RecipeInputError) as caught:
        translation.main(argv)
    assert str(caught.value) == f"`--validation_file` {path}: {said}; fix or remove those rows."


def test_a_non_utf8_byte_in_translation_pairs_names_the_file_and_the_row(workdir, tmp_path):  # noqa: F811
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(lines(pair("the file", "die Datei")).encode() + '{"translation": {"en": "the window", "de": '
                     '"f\u00fcr"}}\n'.encode("latin-1"))
    argv = marian_args(workdir, tmp_path / "out")
    argv[argv.index("--train_file") + 1] = str(path)
    with pytest.raises(RecipeInputError) as caught:
        translation.main(argv)
    assert str(caught.value).startswith(f"`--train_file` {path}: line 2 is not UTF-8 text (byte 0xfc")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe, name, row", [("generation", "long.txt", "just a line\n" + "x" * 2001 + "\n"),
                                               ("translation", "long.jsonl", None)])
def test_a_row_too_long_to_tokenize_is_refused_naming_file_row_and_limit(workdir, tmp_path, recipe, name, row):  # noqa: F811
    """One row is tokenized at once: a very long one (a whole book on one line) costs gigabytes before any training."""
    path = tmp_path / name
    if recipe == "generation":
        path.write_text(row)
        argv = gpt2_args(workdir, tmp_path / "out", "--max_row_chars", "2000")
    else:
        path.write_text(lines(pair("the file", "die Datei"), pair("y" * 2001, "ja")))
        argv = marian_args(workdir, tmp_path / "out", "--max_row_chars", "2000")
    argv[argv.index("--train_file") + 1] = str(path)
    module = generation if recipe == "generation" else translation
    with pytest.raises(RecipeInputError) as caught:
        module.main(argv)
    message = str(caught.value)
    assert message.startswith(f"`--train_file` {path}: ") and "(row 2)" in message
    assert "longer than the `--max_row_chars` limit of 2,000 characters" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_empty_csv_targets_are_refused(workdir, tmp_path):  # noqa: F811
    path = tmp_path / "pairs.csv"
    path.write_text("english,german\nthe file,die Datei\nthe window,\n")
    argv = marian_args(workdir, tmp_path / "out", "--source_column", "english", "--target_column", "german",
                       layout="csv")
    argv[argv.index("--train_file") + 1] = str(path)
    with pytest.raises(RecipeInputError, match=r"pairs\.csv: the text of `german` is missing or null in 1 row\(s\) "
                                               r"\(row 2\)"):
        translation.main(argv)


# ---- 11. damaged θ₀ files, messages that say what to do ------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_anchor_file_is_named(crashed_run, tmp_path, damage):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(crashed_run / "checkpoint-4", checkpoint)
    truncate(checkpoint / ANCHOR_FILE, 0.5 if damage == "truncated" else 0.0)
    with pytest.raises(ValueError, match=f"{checkpoint / ANCHOR_FILE} cannot be read .*truncated or corrupted"):
        load_anchor(str(checkpoint))


def test_resuming_with_a_changed_penalized_set_names_the_settings(tmp_path):
    args = l2_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2, l2_coef=1.0)
    L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset()).train()
    # The checkpoint's θ₀ covers the weights only; biases and LayerNorms are now penalized too.
    wider = l2_args(tmp_path, max_steps=4, l2_coef=1.0, l2_exclude_bias_and_norm=False)
    trainer = L2Trainer(model=tiny_gpt2(), args=wider, train_dataset=TokenDataset())
    with pytest.raises(ValueError) as caught:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    message = str(caught.value)
    assert "the penalized set differs from the checkpoint's (`l2_exclude`, `l2_exclude_bias_and_norm`" in message
    assert "was the model changed" not in message and "Resume with the settings of that run" in message


@pytest.mark.parametrize("flags, said", [
    (["--l2_coef", "-1"], "error: `l2_coef` must be a number ≥ 0, got -1.0."),
    (["--resume_from_checkpoint", "nowhere"], "error: `--resume_from_checkpoint nowhere` is not a folder."),
])
def test_recipe_errors_are_one_line_without_a_traceback(workdir, tmp_path, flags, said):  # noqa: F811
    argv = gpt2_args(workdir, tmp_path / "out", *flags)
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "gpt2_generation.py"), *argv],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == said and "Traceback" not in result.stderr


# ---- 13. a hostile model.safetensors under l2_anchor_path (issue 24) ---------------------------------------------
def rewrite_header(path, edit) -> None:
    """Replace a safetensors file's JSON header by `edit(header)` (padded to 8 bytes), keeping its data."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    raw = json.dumps(edit(json.loads(data[8 : 8 + size]))).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size :])


def swap_offsets(header):
    a, b = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return header


def declare_2_62_bytes(header):
    header["transformer.wte.weight"]["shape"] = [2**60, 1]  # 2^60 float32 values: 2^62 bytes
    return header


def declare_huge_header(path) -> None:
    data = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize(
    ("damage", "said"),
    # safetensors' own reason, as its newer (first) and older (0.4.x) versions word it
    [("huge_header", "(header too large|HeaderTooLarge)"),
     ("swapped_offsets", "(invalid shape, data type, or offset|TensorInvalidInfo)"),
     ("tensor_of_2_62_bytes", "(overflow computing buffer size|TensorInvalidInfo)"),
     ("symlink", "(header too large|HeaderTooLarge)")],
)
def test_a_hostile_anchor_file_is_named_in_one_line_before_training(tmp_path, damage, said):
    folder = tmp_path / "pretrained"
    tiny_gpt2().save_pretrained(folder)
    weights = folder / "model.safetensors"
    if damage == "huge_header":
        declare_huge_header(weights)
    elif damage == "symlink":
        (tmp_path / "notes.txt").write_text("not a safetensors file\n" * 100)
        weights.unlink()
        weights.symlink_to(tmp_path / "notes.txt")
    else:
        rewrite_header(weights, swap_offsets if damage == "swapped_offsets" else declare_2_62_bytes)
    link = rf" \(a link to {tmp_path / 'notes.txt'}\)" if damage == "symlink" else ""
    with pytest.raises(ValueError, match=rf"`l2_anchor_path`: {weights}{link} cannot be read \(SafetensorError: "
                                         rf"Error while deserializing header: {said}"):
        try:
            L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path / "run", l2_anchor_path=str(folder)),
                      train_dataset=TokenDataset())
        except ValueError as err:
            assert "\n" not in str(err)
            raise


# ---- 12. a full disk during a save (issue 24) -----------------------------------------------------------------
# What safetensors raises when a write fails with ENOSPC (its Rust io::Error, wrapped).
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_during_a_save_is_one_line_and_the_rerun_resumes(workdir, tmp_path, capsys, count_steps,  # noqa: F811
                                                                     monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from hf_l2.tools.recipe_common import run

    real, full = transformers.modeling_utils.safe_save_file, [True]

    def writer(tensors, filename, metadata=None):  # the disk fills while checkpoint-4's weights are written
        if full[0] and f"{os.sep}checkpoint-4{os.sep}" in filename:
            with open(filename, "wb") as f:
                f.write(bytes(100))  # what reached the disk before it was full
            raise SafetensorError(DISK_FULL)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", writer)
    out = tmp_path / "run"
    argv = gpt2_args(workdir, out, *SAVING, "--max_steps", "6")
    with pytest.raises(SystemExit) as exit_:
        run(lambda: generation.main(argv))
    said = str(exit_.value.code)
    assert "\n" not in said
    assert said.startswith(f"error: [Errno 28] The disk is full: saving {out / 'checkpoint-4'} stopped at "
                           f"{out / 'checkpoint-4' / 'model.safetensors'} ({DISK_FULL}); this checkpoint is "
                           "incomplete and a rerun skips it")
    assert not (out / "_hf_l2.lock").exists()  # the failed run let go of the folder
    # Space freed: the rerun skips the cut checkpoint and resumes from checkpoint-2.
    full[0] = False
    del count_steps[:]
    capsys.readouterr()
    generation.main(argv)
    said = capsys.readouterr().out
    assert f"Skipping the incomplete checkpoint {out / 'checkpoint-4'}" in said
    assert f"Resuming from {out / 'checkpoint-2'}" in said
    assert count_steps == [2, 3, 4, 5]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
