"""The offline demo and the sweep: a reduced demo end to end, data preparation, drift, tables and their errors."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from helpers import tiny_demo_sizes
from transformers import AutoModelForCausalLM

from hf_l2.tools import sweep_report
from hf_l2.tools.demo import run_demo
from hf_l2.tools.demo.data import prepare
from hf_l2.tools.demo.starting_models import starting_model
from hf_l2.tools.recipe_common import RecipeInputError
from hf_l2.tools.sweep import Setting, grid, run_sweep, starting_point, with_model

TINY = tiny_demo_sizes()  # the same code path as `hf-l2 demo`, seconds instead of minutes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `hf-l2 demo` runs; restored for the other tests
    try:
        path = run_demo(root / "out", root / "cache", modes=("none", "l2_sp"), coefs=(1.0,), seeds=(0, 1), sizes=TINY,
                        kl_coefs=(1.0,), wise_ft_weights=(0.5,))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "out": root / "out", "cache": root / "cache", "report": path}


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.parametrize(
    "task, metrics",
    [("generation", ["perplexity"]), ("translation", ["perplexity", "BLEU", "chrF"])],
)
def test_reduced_demo_tables_have_every_setting_with_finite_numbers(demo, task, metrics):
    rows = table_rows((demo["out"] / task / "results.md").read_text())
    header, body = rows[0], rows[2:]
    expected = ["setting", "runs"] + [f"target {m} {'↓' if m == 'perplexity' else '↑'}" for m in metrics]
    expected += [f"pretraining {m} {'↓' if m == 'perplexity' else '↑'}" for m in metrics]
    expected += ["drift ‖θ−θ₀‖"]
    assert header == expected
    assert [(r[0], r[1]) for r in body] == [("start", "1"), ("none", "2"), ("l2_sp α=1", "2"), ("kl λ=1", "2"),
                                            ("wise_ft t=0.5", "2")]
    for row in body:
        cells = row[2:]
        assert len(cells) == len(expected) - 2
        for cell in cells:
            numbers = [float(x) for x in cell.split(" ± ")]
            assert all(math.isfinite(x) for x in numbers) and len(numbers) == (1 if row[0] == "start" else 2)
    assert (demo["out"] / task / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![{task}]({task}/results.png)" in demo["report"].read_text()


def test_table_is_the_mean_and_spread_of_the_recorded_runs(demo):
    """Recompute one cell from results.jsonl: the table shows mean ± sample standard deviation over seeds."""
    runs = [json.loads(line) for line in (demo["out"] / "generation" / "results.jsonl").read_text().splitlines()]
    none = [r["eval_perplexity"] for r in runs if r["setting"] == "none"]
    assert len(none) == 2 and all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in runs)
    cell = next(r for r in table_rows((demo["out"] / "generation" / "results.md").read_text()) if r[0] == "none")[2]
    mean, std = statistics.fmean(none), statistics.stdev(none)
    digits = 1 if mean >= 100 else 2
    assert cell == f"{mean:.{digits}f} ± {std:.{digits}f}"


def test_drift_is_the_distance_from_the_starting_model(demo):
    """Checked against the models' parameters loaded by transformers, not the saved tensors the sweep reads."""
    runs = [json.loads(line) for line in (demo["out"] / "generation" / "results.jsonl").read_text().splitlines()]
    start_folder = next(demo["cache"].glob("start-generation-*"))
    start = dict(AutoModelForCausalLM.from_pretrained(start_folder).named_parameters())
    for run in [r for r in runs[1:] if r["mode"] != "wise_ft"]:  # (WiSE-FT's drift: test_sweep_wise_ft_...)
        folder = demo["out"] / "generation" / "runs" / f"{Setting(run['mode'], run['coef']).slug}-seed{run['seed']}"
        tuned = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
        expected = math.sqrt(sum((tuned[n].double() - start[n].double()).pow(2).sum().item() for n in start))
        assert run["drift"] == pytest.approx(expected, rel=1e-6) and run["drift"] > 0
    assert runs[0]["setting"] == "start" and runs[0]["drift"] == 0.0


def test_starting_models_are_cached_by_their_settings(demo):
    data = prepare(demo["cache"])
    folder = starting_model("translation", data, TINY.pretraining["translation"], demo["cache"])
    assert folder.parent == demo["cache"] and (folder / "model.safetensors").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert starting_model("translation", data, TINY.pretraining["translation"], demo["cache"]) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    identity = json.loads((folder / "pretraining.json").read_text())
    assert identity["settings"]["steps"] == 4 and identity["data"] == data.key


def test_data_preparation_is_deterministic_and_cached(tmp_path):
    first, second = prepare(tmp_path / "a"), prepare(tmp_path / "b")
    assert first.key == second.key
    files = sorted(p.relative_to(first.folder) for p in first.folder.rglob("*") if p.is_file())
    assert files and all((first.folder / f).read_bytes() == (second.folder / f).read_bytes() for f in files)
    mtime = first.generation("target_train").stat().st_mtime_ns
    assert prepare(tmp_path / "a").folder == first.folder
    assert first.generation("target_train").stat().st_mtime_ns == mtime
    # The domains are disjoint where they must be: nothing held out was trained on.
    for task, suffix in (("generation", "txt"), ("translation", "jsonl")):
        for domain in ("pretrain", "target"):
            train = set((first.folder / task / f"{domain}_train.{suffix}").read_text().splitlines())
            held_out = set((first.folder / task / f"{domain}_validation.{suffix}").read_text().splitlines())
            assert held_out and not train & held_out
    pair = json.loads(first.translation("target_train").read_text().splitlines()[0])["translation"]
    assert set(pair) == {"en", "de"} and all(pair.values())


def test_a_failed_demo_leaves_no_old_report(tmp_path):
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / "demo.md"
    stale.write_text("# an old table")
    with pytest.raises(RecipeInputError, match="l2_coef"):
        run_demo(tmp_path / "out", tmp_path / "cache", coefs=(-1.0,), sizes=TINY)
    assert not stale.exists()


# ---- sweep and report pieces --------------------------------------------------------------------------------
def test_grid_runs_none_once_and_every_other_mode_at_every_alpha():
    assert grid(["none", "l2", "l2_sp"], [0.1, 1.0]) == [
        Setting("none", 0.0), Setting("l2", 0.1), Setting("l2", 1.0), Setting("l2_sp", 0.1), Setting("l2_sp", 1.0)
    ]
    assert [s.label for s in grid(["l2_sp"], [0.01])] == ["l2_sp α=0.01"]
    kl = grid(["none", "l2_sp"], [0.1], [0.5, 2.0])
    assert kl[2:] == [Setting("kl", 0.5), Setting("kl", 2.0)] and kl[3].label == "kl λ=2"
    assert kl[2].flags == ["--l2_mode", "none", "--l2_kl_coef", "0.5", "--l2_token_weighting", "none"]  # KL alone
    assert kl[1].flags == ["--l2_mode", "l2_sp", "--l2_coef", "0.1"]
    with pytest.raises(RecipeInputError, match="l2_kl_coef.*finite"):
        grid(["l2_sp"], [0.1], [-1.0])
    asft = grid(["none"], [], [1.0], [0.5], asft_coefs=[1.0])  # after the KL, before WiSE-FT
    assert asft == [Setting("none", 0.0), Setting("kl", 1.0), Setting("asft", 1.0), Setting("wise_ft", 0.5)]
    assert asft[2].flags == ["--l2_mode", "none", "--l2_kl_coef", "1.0", "--l2_token_weighting", "dft"]
    assert asft[2].label == "asft λ=1"
    with pytest.raises(RecipeInputError, match="asft_coef.*finite"):
        grid(["none"], [], asft_coefs=[float("inf")])
    for modes, coefs, message in [(["l3"], [1.0], "l2_mode.*l3"), (["l2"], [], "at least one α"),
                                  (["l2_sp"], [float("nan")], "finite")]:
        with pytest.raises(RecipeInputError, match=message):
            grid(modes, coefs)


def test_sweep_refuses_recipe_arguments_it_sets_and_needs_the_starting_model():
    assert starting_point(["--train_file", "a.txt", "--model_name_or_path", "m1", "--model_name_or_path=m2"]) == "m2"
    with pytest.raises(RecipeInputError, match="--l2_coef.*set by the sweep"):
        starting_point(["--model_name_or_path", "m", "--l2_coef", "0.1"])
    with pytest.raises(RecipeInputError, match="--model_name_or_path"):
        starting_point(["--train_file", "a.txt"])
    with pytest.raises(RecipeInputError, match="run.yaml: .*as flags"):
        starting_point(["run.yaml"])


@pytest.mark.parametrize("second, message", [(float("nan"), "is nan"), (None, "is None")])
def test_report_refuses_missing_or_non_finite_numbers(tmp_path, second, message):
    rows = [{"setting": "none", "mode": "none", "coef": 0.0, "seed": s, "drift": 1.0, "eval_perplexity": p}
            for s, p in ((0, 10.0), (1, second))]
    if second is None:
        del rows[1]["eval_perplexity"]
    with pytest.raises(sweep_report.SweepResultError,
                       match=f"'none' seed 1: `eval_perplexity` {message}, not a number"):
        sweep_report.write_report(rows, tmp_path, "t")
    assert not list(tmp_path.iterdir())  # nothing written


def generation_arguments(demo) -> list[str]:
    """The generation recipe's arguments on the reduced demo's starting model and data (2 steps)."""
    data = prepare(demo["cache"])
    return ["--model_name_or_path", str(next(demo["cache"].glob("start-generation-*"))),
            "--train_file", str(data.generation("target_train")),
            "--validation_file", str(data.generation("target_validation")),
            "--block_size", "32", "--max_steps", "2", "--max_eval_samples", "4", "--use_cpu", "true",
            "--cache_dir", str(demo["cache"] / "datasets")]


def test_sweep_command_line_runs_a_recipe_and_prints_its_table(demo, tmp_path, capsys):
    from hf_l2.tools.cli import main
    recipe_args = generation_arguments(demo)
    assert main(["sweep", "--recipe", "gpt2_generation", "--l2_mode", "l2_sp", "--l2_coef", "0", "1",
                 "--l2_kl_coef", "1", "--asft_coef", "1", "--seeds", "3", "--output_dir", str(tmp_path), "--",
                 *recipe_args]) == 0
    printed = capsys.readouterr().out
    assert "[3/5] l2_sp-1-seed3" in printed and "| l2_sp α=1 | 1 |" in printed
    assert "[4/5] kl-1-seed3" in printed and "| kl λ=1 | 1 |" in printed
    assert "[5/5] asft-1-seed3" in printed and "| asft λ=1 | 1 |" in printed
    header = table_rows((tmp_path / "results.md").read_text())[0]
    # No pretraining-domain file was given: no forgetting columns.
    assert header == ["setting", "runs", "target perplexity ↓", "drift ‖θ−θ₀‖"]
    assert (tmp_path / "results.png").is_file() and (tmp_path / "runs" / "l2_sp-0-seed3.log").is_file()

    with pytest.raises(SystemExit, match="error: Pass `--model_name_or_path`"):
        main(["sweep", "--recipe", "gpt2_generation", "--l2_coef", "1", "--output_dir", str(tmp_path),
              "--", "--train_file", "x.txt"])


# Every method the sweep knows that reuses earlier runs: F computed once, WiSE-FT of the `none` runs.
METHODS = grid(["none", "l2_sp_fisher"], [1.0], wise_ft_weights=[0.5])


@pytest.fixture(scope="module")
def method_sweep(demo, tmp_path_factory):
    # All blocks of the 93 held-out pretraining paragraphs: every seed's F is over the same examples.
    recipe_args = [*generation_arguments(demo), "--fisher_file", str(prepare(demo["cache"]).generation(
        "pretrain_validation")), "--l2_fisher_samples", "100000", "--learning_rate", "1e-2"]
    out = tmp_path_factory.mktemp("methods")
    return {"args": recipe_args, "out": out, "rows": run_sweep("gpt2_generation", recipe_args, METHODS, [0, 1], out)}


def _numbers(row: dict) -> dict:
    """A row without its timings (the only numbers that differ between two identical runs)."""
    return {k: v for k, v in row.items() if not k.endswith(("_runtime", "_per_second", "_time"))}


@pytest.mark.slow  # two spawned workers import torch and transformers: half a minute
def test_sweep_in_worker_processes_gives_the_rows_of_one_process(method_sweep, tmp_path, capsys):
    rows = run_sweep("gpt2_generation", method_sweep["args"], METHODS, [0, 1], tmp_path, jobs=2)
    assert [_numbers(r) for r in rows] == [_numbers(r) for r in method_sweep["rows"]]
    assert [r["setting"] for r in rows] == ["start", "none", "none", "l2_sp_fisher α=1", "l2_sp_fisher α=1",
                                            "wise_ft t=0.5", "wise_ft t=0.5"]
    assert "[7/7]" in capsys.readouterr().out


def test_sweep_computes_the_fisher_once_and_the_reuse_changes_nothing(method_sweep, tmp_path):
    """The seed-1 run loaded seed 0's F; a standalone seed-1 run computes its own: the same final weights."""
    from hf_l2.recipes import gpt2_generation

    from hf_l2.saved_state import load_fisher

    runs = method_sweep["out"] / "runs"
    assert load_fisher(str(runs / "l2_sp_fisher-1-seed1"))[2]["path"] == str(runs / "l2_sp_fisher-1-seed0" /
                                                                              "l2_fisher.safetensors")
    assert "path" not in load_fisher(str(runs / "l2_sp_fisher-1-seed0"))[2]
    gpt2_generation.main([*method_sweep["args"], "--l2_mode", "l2_sp_fisher", "--l2_coef", "1", "--seed", "1",
                          "--output_dir", str(tmp_path), "--report_to", "none", "--save_strategy", "no"])
    alone = dict(AutoModelForCausalLM.from_pretrained(tmp_path).named_parameters())
    swept = dict(AutoModelForCausalLM.from_pretrained(runs / "l2_sp_fisher-1-seed1").named_parameters())
    start = dict(AutoModelForCausalLM.from_pretrained(method_sweep["args"][1]).named_parameters())
    assert any((alone[n] - start[n]).abs().max() > 1e-2 for n in start)  # it trained
    for name in alone:
        torch.testing.assert_close(swept[name], alone[name], rtol=1e-5, atol=1e-6)


def test_sweep_wise_ft_is_the_midpoint_of_the_start_and_the_none_run(method_sweep):
    runs = method_sweep["out"] / "runs"
    start = dict(AutoModelForCausalLM.from_pretrained(method_sweep["args"][1]).named_parameters())
    for seed in (0, 1):
        tuned = dict(AutoModelForCausalLM.from_pretrained(runs / f"none-seed{seed}").named_parameters())
        mixed = dict(AutoModelForCausalLM.from_pretrained(runs / f"wise_ft-seed{seed}" / "weight-0.5")
                     .named_parameters())
        for name in start:
            torch.testing.assert_close(mixed[name], (start[name] + tuned[name]) / 2, rtol=0, atol=1e-6)
    rows = {(r["setting"], r["seed"]): r for r in method_sweep["rows"]}
    for seed in (0, 1):
        wise, none = rows["wise_ft t=0.5", seed], rows["none", seed]
        assert wise["drift"] == pytest.approx(none["drift"] / 2, rel=1e-5)
        # Halfway back toward the start: the loss on the target domain lies between the two ends.
        assert rows["start", None]["eval_loss"] > wise["eval_loss"] > none["eval_loss"]


def test_grid_adds_wise_ft_after_every_other_method_and_needs_the_none_runs():
    settings = grid(["none", "l2_sp"], [0.1], [1.0], [0.25, 0.5])
    assert [s.label for s in settings] == ["none", "l2_sp α=0.1", "kl λ=1", "wise_ft t=0.25", "wise_ft t=0.5"]
    with pytest.raises(RecipeInputError, match="wise_ft_weight.*add `none`"):
        grid(["l2_sp"], [0.1], wise_ft_weights=[0.5])
    with pytest.raises(RecipeInputError, match=r"wise_ft_weight.*\[1.5\].*\[0, 1\]"):
        grid(["none"], [], wise_ft_weights=[1.5])
    assert with_model(["--a", "1", "--model_name_or_path", "m", "--model_name_or_path=n"], "x") == [
        "--a", "1", "--model_name_or_path", "x"]


def test_missing_catalogs_say_what_to_install(monkeypatch):
    from hf_l2.tools.demo import data

    monkeypatch.setitem(data.CATALOGS, "django", ("not_an_installed_module", "de"))
    with pytest.raises(data.DemoDataError, match=r"`not_an_installed_module`.*pip install -e \"\.\[demo\]\""):
        data.prepare("unused")


def _rows(points: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """Sweep rows with BLEU only: setting label → per-seed (target BLEU, pretraining BLEU)."""
    rows = []
    for label, seeds in points.items():
        mode, _, coef = label.partition(" α=")
        for seed, (target, pretrain) in enumerate(seeds):
            rows.append({"setting": label, "mode": mode, "coef": float(coef or 0), "seed": seed, "drift": 1.0,
                         "eval_bleu": target, "eval_pretrain_bleu": pretrain})
    return rows


def test_frontier_summary_names_the_best_method_within_the_forgetting_budget():
    # Start 30, no penalty 10: half the forgetting allows pretraining BLEU ≥ 20. l2 α=1 (22) and l2_sp α=0.1 (25)
    # and α=1 (28) qualify; l2_sp α=0.1 has the best target mean (19 vs l2's 14): a gap of 5 against a spread of
    # 1 + 1 (each std of two seeds at ±0.707... is 1).
    rows = _rows({
        "start": [(5.0, 30.0)],
        "none": [(20.0, 10.0), (20.0, 10.0)],
        "l2 α=0.1": [(18.0, 12.0), (18.0, 12.0)],
        "l2 α=1": [(14 - 0.5 ** 0.5, 22.0), (14 + 0.5 ** 0.5, 22.0)],
        "l2_sp α=0.1": [(19 - 0.5 ** 0.5, 25.0), (19 + 0.5 ** 0.5, 25.0)],
        "l2_sp α=1": [(12.0, 28.0), (12.0, 28.0)],
    })
    sentence = sweep_report.frontier_summary(sweep_report.summarize(rows))
    assert "pretraining BLEU ≥ 20.00; start 30.00, no penalty 10.00" in sentence
    assert "l2_sp α=0.1 (19.00 ± 1.00) gives the best target BLEU, 5.00 better than the best of l2" in sentence
    assert "l2 α=1 (14.00 ± 1.00): beyond the seeds' spread (2.00" in sentence
    assert "no penalty reaches 20.00 ± 0.00" in sentence
    # A tighter budget (10% of the forgetting: ≥ 28) leaves l2_sp α=1 alone; an impossible one, nothing.
    summaries = sweep_report.summarize(rows)
    assert "only l2_sp qualifies: l2_sp α=1 (12.00 ± 0.00)" in sweep_report.frontier_summary(summaries, 0.1)
    assert sweep_report.frontier_summary(summaries, 0.0).endswith("no setting qualifies.")


def test_budget_table_lists_each_methods_best_setting_within_the_budget(tmp_path):
    # Start 30, no penalty 10: pretraining BLEU ≥ 20 qualifies. kl λ=1 (target 21) beats l2_sp α=0.1 (19); l2 α=0.1
    # (pretraining 12) is out, l2 α=1 (22) in; wise_ft t=0.5 (pretraining 20, exactly the limit) counts.
    rows = _rows({
        "start": [(5.0, 30.0)],
        "none": [(20.0, 10.0)],
        "l2 α=0.1": [(18.0, 12.0)],
        "l2 α=1": [(14.0, 22.0)],
        "l2_sp α=0.1": [(19.0, 25.0)],
        "l2_sp α=1": [(12.0, 28.0)],
        "kl α=1": [(21.0, 21.0)],
        "wise_ft α=0.5": [(13.0, 20.0)],
    })
    lines = sweep_report.budget_table(sweep_report.summarize(rows)).splitlines()
    assert lines[0] == "| method | best setting within the budget | target BLEU ↑ | pretraining BLEU ↑ |"
    assert [line.split(" | ")[1] for line in lines[2:]] == ["kl α=1", "l2_sp α=0.1", "l2 α=1", "wise_ft α=0.5"]
    assert lines[2] == "| kl | kl α=1 | 21.00 | 21.00 |"
    table, _ = sweep_report.write_report(rows, tmp_path, "t")
    assert "| l2_sp | l2_sp α=0.1 | 19.00 | 25.00 |" in table.read_text()
    assert sweep_report.budget_table(sweep_report.summarize(rows), 0.0) is None  # nothing qualifies: no table


def test_frontier_summary_says_when_nothing_was_forgotten_and_plot_draws_any_method(tmp_path):
    rows = _rows({"start": [(5.0, 10.0)], "none": [(20.0, 12.0)], "wise_ft α=0.5": [(12.0, 11.0)]})
    sentence = sweep_report.frontier_summary(sweep_report.summarize(rows))
    assert "did not lower the pretraining-domain BLEU (10.00 → 12.00)" in sentence
    table, figure = sweep_report.write_report(rows, tmp_path, "t")  # a mode the report has no color for still plots
    assert figure.read_bytes()[:4] == b"\x89PNG" and "did not lower" in table.read_text()
    assert sweep_report.frontier_summary(sweep_report.summarize([r for r in rows if r["mode"] != "start"])) is None


def test_nothing_forgotten_is_worded_by_the_metrics_direction():
    """Perplexity falls when nothing is forgotten: the sentence must not say it "did not lower" it."""
    rows = [{"setting": setting, "mode": setting, "coef": 0.0, "seed": 0, "drift": 1.0, "eval_perplexity": target,
             "eval_pretrain_perplexity": pretrain}
            for setting, target, pretrain in (("start", 900.0, 908.0), ("none", 90.0, 693.77))]
    sentence = sweep_report.frontier_summary(sweep_report.summarize(rows))
    assert "did not raise the pretraining-domain perplexity (908.00 → 693.77)" in sentence


def test_catalog_pairs_keep_english_messages_and_drop_keys_and_long_help(tmp_path, monkeypatch):
    """A German catalog written here with polib: what `catalog_pairs` keeps is decided by hand."""
    import polib

    from hf_l2.tools.demo import data

    folder = tmp_path / "fake_catalogs" / "locales" / "de" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    (tmp_path / "fake_catalogs" / "__init__.py").write_text("")
    catalog = polib.POFile()
    long_help = " ".join(["word"] * (data.MAX_WORDS + 1))
    for msgid, msgstr in [("Delete  the\nfile", "Datei löschen"), ("label_title", "Titel"), ("month_oct_abbr", "Okt"),
                          ("Save", "Speichern"), ("Untranslated", ""), (long_help, "lang")]:
        catalog.append(polib.POEntry(msgid=msgid, msgstr=msgstr))
    catalog.append(polib.POEntry(msgid="%d file", msgid_plural="%d files",
                                 msgstr_plural={0: "%d Datei", 1: "%d Dateien"}))
    catalog.save_as_mofile(str(folder / "a.mo"))
    later = polib.POFile()  # read after a.mo: its translation of a message a.mo has is not kept
    later.append(polib.POEntry(msgid="Save", msgstr="Sichern"))
    later.save_as_mofile(str(folder / "b.mo"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(data.CATALOGS, "fake", ("fake_catalogs", "de"))
    assert data.catalog_pairs("fake") == [("%d file", "%d Datei"), ("Delete the file", "Datei löschen"),
                                          ("Save", "Speichern")]


def test_pretraining_pairs_are_many_and_never_a_fine_tuning_message(tmp_path):
    parts = prepare(tmp_path)
    rows = {part: [json.loads(line)["translation"] for line in parts.translation(part).read_text().splitlines()]
            for part in ("pretrain_train", "pretrain_validation", "target_train", "target_validation")}
    assert len(rows["pretrain_train"]) >= 5000 and len(rows["pretrain_validation"]) == 500
    target = {r["en"] for r in rows["target_train"] + rows["target_validation"]}
    assert not target & {r["en"] for r in rows["pretrain_train"] + rows["pretrain_validation"]}


def test_make_demo_sets_the_pins_the_report_reads():
    """The Makefile cannot import `PINS`: its `FLOAT_PATH` line is kept equal to it here."""
    from helpers import ROOT

    from hf_l2.tools.demo.float_path import PINS

    line = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("FLOAT_PATH ="))
    assert line.split("=", 1)[1].split() == [f"{name}={value}" for name, value in PINS.items()]
