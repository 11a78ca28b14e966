"""The model card of a tiny real run: Hub-valid metadata, and numbers that are the run's own."""

import logging
import os
import shlex
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest
from helpers import TokenDataset, build_wheel, l2_args, params_of, penalized, tiny_gpt2
from huggingface_hub import ModelCard, ModelCardData

from hf_l2 import L2Trainer
from hf_l2.publishing import card as model_card
from hf_l2.publishing.card import PLOT_FILE, final_evaluation, plot_training
from hf_l2.publishing.reproduce import card_command, process_command


def table_row(card_text: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row whose first cell is `first_cell`."""
    line = next(line for line in card_text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def norm(tensors) -> float:
    return sum(t.double().pow(2).sum().item() for t in tensors) ** 0.5


def as_script(monkeypatch, argv):
    """Make this process look like `python <argv>`, started without a launcher."""
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)


def test_card_of_a_tiny_l2_sp_run(tmp_path, monkeypatch):
    model = tiny_gpt2()
    start = params_of(model)
    args = l2_args(tmp_path / "out", l2_coef=1.0, max_steps=4, logging_steps=2)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=4, seed=3))
    trainer.train()
    metrics = trainer.evaluate()
    as_script(monkeypatch, ["recipes/gpt2_generation.py", "--output_dir", "my run", "--l2_coef", "1.0"])
    trainer.create_model_card(
        finetuned_from="openai-community/gpt2", dataset_tags="wikitext", dataset="WikiText-2",
        dataset_args="wikitext-2-raw-v1", language="en", license="apache-2.0", tags=["tiny"],
    )
    card = ModelCard.load(tmp_path / "out" / "README.md")

    # Metadata as the Hub reads it, and read back through ModelCardData a second time.
    data = ModelCardData(**card.data.to_dict()).to_dict()
    assert data["base_model"] == "openai-community/gpt2"
    assert (data["datasets"], data["language"], data["license"]) == (["wikitext"], "en", "apache-2.0")
    assert data["library_name"] == "transformers"
    assert {"hf_l2", "l2-sp", "tiny"} <= set(data["tags"])
    (result,) = data["model-index"][0]["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"] == {"name": "WikiText-2", "type": "wikitext", "config": "wikitext-2-raw-v1"}
    (metric,) = result["metrics"]
    assert (metric["type"], metric["value"]) == ("loss", metrics["eval_loss"])

    # Body: the eval table and the drift, against the trainer's state and a computation from the weights.
    text = card.text
    assert float(table_row(text, "eval_loss")[0]) == pytest.approx(metrics["eval_loss"], rel=1e-5)
    now = params_of(model)
    names = [n for n in now if penalized(n)]
    drift = norm(now[n] - start[n] for n in names)
    expected = {
        "all": (drift, drift / norm(start[n] for n in names), norm(now[n] for n in names)),
        "attention": (norm(now[n] - start[n] for n in names if ".attn." in n),),
        "embeddings": (norm(now[n] - start[n] for n in names if n.endswith(("wte.weight", "wpe.weight"))),),
    }
    for group, values in expected.items():
        cells = [float(c) for c in table_row(text, group)]
        assert cells[: len(values)] == pytest.approx(list(values), rel=1e-5)
    last_log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last_log["step"] == trainer.state.global_step == 4
    assert float(table_row(text, "all")[0]) == pytest.approx(last_log["l2/drift"], rel=1e-5)

    assert "| α (`l2_coef`) | 1 |" in text
    assert "the weights of `openai-community/gpt2` when fine-tuning started" in text
    assert "python recipes/gpt2_generation.py --output_dir 'my run' --l2_coef 1.0" in text
    assert "Li, Xuhong and Grandvalet, Yves and Davoine, Franck" in text
    assert f"]({PLOT_FILE})" in text
    assert (tmp_path / "out" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A later save_model() writes the card again with the same metadata, beside the weights.
    trainer.save_model()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    again = ModelCard.load(tmp_path / "out" / "README.md")
    assert (again.data.language, again.data.base_model) == ("en", "openai-community/gpt2")


def test_plot_draws_the_logged_values(tmp_path):
    history = [
        {"loss": 3.0, "l2/penalty": 0.1, "l2/drift": 0.5, "l2/coef": 0.2, "step": 2},
        {"eval_loss": 3.2, "step": 2},
        {"loss": 2.5, "l2/penalty": 0.3, "l2/drift": 0.9, "l2/coef": 0.2, "step": 4},
    ]
    figure = plot_training(history, str(tmp_path / "plot.png"))
    loss, penalty, drift = figure.axes  # a constant α gets no panel
    assert [list(line.get_ydata()) for line in loss.lines] == [[3.0, 2.5], [3.2]]
    assert list(penalty.lines[0].get_xdata()) == [2, 4] and list(penalty.lines[0].get_ydata()) == [0.1, 0.3]
    assert list(drift.lines[0].get_ydata()) == [0.5, 0.9]

    history[2]["l2/coef"] = 0.1  # a schedule lowered it
    assert list(plot_training(history, str(tmp_path / "plot.png")).axes[3].lines[0].get_ydata()) == [0.2, 0.1]
    assert plot_training([{"train_runtime": 1.0, "step": 0}], str(tmp_path / "none.png")) is None


def test_final_evaluation_merges_what_was_logged_at_its_step():
    history = [{"eval_loss": 3.0, "step": 2}, {"loss": 2.0, "step": 4},
               {"eval_loss": 2.5, "eval_runtime": 0.1, "epoch": 1.0, "step": 4}, {"eval_perplexity": 12.2, "step": 4}]
    assert final_evaluation(history) == (4, {"loss": 2.5, "perplexity": 12.2})
    assert final_evaluation([{"loss": 2.0, "step": 4}]) == (None, {})


@pytest.mark.parametrize("mode, extra", [
    ("l2", {}),
    ("none", {}),
    ("l2_sp", {"l2_impl": "decoupled", "l2_coef_schedule": "linear", "l2_coef_end_factor": 0.5}),
])
def test_cards_of_other_modes_impls_and_schedules(tmp_path, mode, extra):
    model = tiny_gpt2()
    start = params_of(model)
    trainer = L2Trainer(model=model, args=l2_args(tmp_path, l2_mode=mode, l2_coef=0.5, max_steps=2, **extra),
                        train_dataset=TokenDataset())
    trainer.train()
    trainer.create_model_card()  # no dataset, no base model: a valid card without model-index
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert {"hf_l2", {"l2": "l2", "none": "no-penalty", "l2_sp": "l2-sp"}[mode]} <= set(data["tags"])
    assert "base_model" not in data and "model-index" not in data
    assert "a `GPT2LMHeadModel` (not from the Hub)" in card.text
    names = [n for n in start if penalized(n)]
    if mode == "l2":
        weight_norm = norm(p.detach() for n, p in model.named_parameters() if penalized(n))
        assert float(table_row(card.text, "all")[0]) == pytest.approx(weight_norm, rel=1e-5)
        assert "keeps no anchor" in card.text and "‖θ − θ₀‖ |" not in card.text
    elif mode == "none":
        assert "No penalty was added" in card.text and "| all |" not in card.text
    else:
        assert "Each optimizer step also took a step of the learning rate's size on Ω(θ)" in card.text
        assert "| implementation (`l2_impl`) | `decoupled`: " in card.text
        assert "`linear`: α and β × a factor going from 1 to 0.5" in card.text
        drift = norm(model.get_parameter(n).detach() - start[n] for n in names)
        assert float(table_row(card.text, "all")[0]) == pytest.approx(drift, rel=1e-5)


@pytest.mark.parametrize("mode, dft, kl, says", [
    ("none", True, 0.5, "with no weight penalty and Anchored SFT (DFT token weighting and a KL anchor"),
    ("none", False, 0.5, "with no weight penalty and a KL anchor to the starting model's predictions"),
    ("l2_sp", True, 0.0, "with an L2-SP penalty (Li, Grandvalet & Davoine, ICML 2018) and DFT token weighting"),
])
def test_the_card_names_the_token_level_terms_of_the_loss(tmp_path, mode, dft, kl, says):
    """A run with the KL anchor or DFT is no stock-Trainer baseline, whatever its `l2_mode`."""
    args = l2_args(tmp_path, l2_mode=mode, l2_kl_coef=kl, l2_kl_temperature=2.0, max_steps=1,
                   l2_token_weighting="dft" if dft else "none")
    trainer = L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    trainer.train()
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    assert says in text and "baseline" not in text
    assert ("Dynamic Fine-Tuning" in text) == dft
    assert ("(λ = 0.5, `l2_kl_coef`; τ = 2, `l2_kl_temperature`)" in text) == bool(kl)
    assert ("Anchored SFT (ASFT" in text) == (dft and bool(kl))


def test_card_of_a_lora_run_reports_the_weight_change(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"], fan_in_fan_out=True))
    args = l2_args(tmp_path, l2_coef=0.5, l2_lora_delta=True, max_steps=2, learning_rate=0.1)
    trainer = L2Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    # B starts at zero, so ΔW − ΔW₀ = s·B·A for each adapted layer.
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    delta = norm(m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight for m in layers)
    assert delta > 0
    sentence = f"LoRA weight change ‖ΔW − ΔW₀‖ over the {len(layers)} adapted layers at step 2: "
    assert float(card.text.split(sentence)[1].split(".\n")[0]) == pytest.approx(delta, rel=1e-5)
    assert f"{len(layers)} LoRA layers through their weight change ΔW = s·B·A" in card.text


def test_a_local_base_model_is_named_but_kept_out_of_the_metadata(tmp_path, caplog):
    trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path))
    with caplog.at_level(logging.WARNING):
        trainer.create_model_card(finetuned_from="/models/my-gpt2")
    assert "`finetuned_from`='/models/my-gpt2' is neither a Hub model id" in caplog.text
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None
    assert "the local model `/models/my-gpt2`" in card.text and "the weights of `/models/my-gpt2`" in card.text


@pytest.mark.parametrize(
    "argv, env, main_module, expected",
    [
        (["train.py", "--x", "1"], {}, None, "python train.py --x 1"),
        (["/abs/recipes/run.py", "--x", "1"], {}, "recipes.run", "python -m recipes.run --x 1"),
        (["train.py"], {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "1"}, None,
         "torchrun --nnodes 2 --nproc_per_node 2 train.py"),
        (["train.py", "--bf16", "true"], {"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16",
                                          "TORCHELASTIC_RUN_ID": "1"}, None,
         "accelerate launch --num_processes 2 --mixed_precision bf16 train.py --bf16 true"),
    ],
)
def test_without_the_launchers_command_line_the_environment_tells_what_it_can(monkeypatch, argv, env, main_module,
                                                                               expected):
    """This process's parent (pytest's shell) is no launcher: the launcher is rebuilt from its variables, and the
    card says that its other options are missing."""
    as_script(monkeypatch, argv)
    if main_module:
        sys.modules["__main__"].__spec__ = types.SimpleNamespace(name=main_module)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command = process_command()
    assert shlex.join(command.words) == expected
    assert bool(command.notes) == bool(env) and all("could not be read" in note for note in command.notes)


@pytest.fixture
def launcher_process():
    """A process whose command line is a launcher's (`.../accelerate launch ...`), to stand as this one's parent."""
    started = []

    def start(*words):
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *words])
        started.append(process)
        return process.pid

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_the_card_records_the_launcher_as_typed_with_copies_of_its_config_files(tmp_path, monkeypatch,
                                                                                launcher_process):
    monkeypatch.chdir(tmp_path)
    Path("accelerate.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    Path("run.yaml").write_text("# my run\nl2_coef: 0.1\nhub_token: hf_FILESECRET\nmax_steps: 10\n")
    script_args = ["run.yaml", "--max_steps", "3", "--hub_token", "hf_SECRET1", "--wandb_api_key=SECRET2",
                   "--max_new_tokens", "5"]
    parent = launcher_process("/venv/bin/accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                              "--config_file", "accelerate.yaml", "recipes/gpt2_generation.py", *script_args)
    as_script(monkeypatch, ["/abs/recipes/gpt2_generation.py", *script_args])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setattr(os, "getppid", lambda: parent)
    for _ in range(100):  # until the child has its command line
        if b"launch" in Path(f"/proc/{parent}/cmdline").read_bytes():
            break
        time.sleep(0.05)

    text, notes = card_command(None, "out")
    assert text == ("accelerate launch --multi_gpu --num_processes 2 --config_file out/reproduce/accelerate.yaml "
                    "recipes/gpt2_generation.py out/reproduce/run.yaml --max_steps 3 --max_new_tokens 5")
    assert Path("out/reproduce/accelerate.yaml").read_text() == Path("accelerate.yaml").read_text()
    assert Path("out/reproduce/run.yaml").read_text() == "# my run\nl2_coef: 0.1\nmax_steps: 10\n"
    assert notes == [("The config files it names are copies saved with the model, in `reproduce/`: "
                     "`accelerate.yaml`, `run.yaml`.")]


@pytest.mark.parametrize("given, expected", [
    ("python train.py --hub_token hf_X --lr 1", "python train.py --lr 1"),
    ("python train.py --push_to_hub --hub-token=hf_X --secret_key abc --password pw --prompt_tokens 3",
     "python train.py --push_to_hub --prompt_tokens 3"),
    ("python train.py --tokenizer_name t --keep_linebreaks", "python train.py --tokenizer_name t --keep_linebreaks"),
])
def test_a_given_command_loses_its_secrets_only(tmp_path, given, expected):
    assert card_command(given, str(tmp_path)) == (expected, [])


def test_a_built_wheel_ships_the_template_and_the_console_script(tmp_path, monkeypatch):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        entry_points = archive.read(next(f for f in files if f.endswith("entry_points.txt"))).decode()
    shipped = {"hf_l2/model_cards/template.md", "hf_l2/tools/metrics/sacrebleu.py", "hf_l2/recipes/gpt2_generation.py",
               "hf_l2/recipes/marian_translation.py", "hf_l2/recipes/configs/gpt2_generation.yaml",
               "hf_l2/recipes/accelerate_configs/fsdp2.yaml", "hf_l2/examples/quickstart.py",
               "hf_l2/examples/trl_sft.py"}
    assert shipped <= set(files)
    assert not any(f.startswith("hf_l2/model_cards/example") for f in files)
    assert "hf-l2 = hf_l2.tools:main" in entry_points

    # Unpacked as pip installs it, the package finds the template beside itself, not in this checkout.
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    installed = tmp_path / "site" / "hf_l2"
    monkeypatch.setattr(model_card, "__file__", str(installed / "publishing" / "card.py"))
    assert model_card.template_path() == installed / "model_cards" / "template.md"
