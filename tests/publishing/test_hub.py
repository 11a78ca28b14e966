"""Pushing to the Hub through huggingface_hub's own client, with only the network replaced by a fake Hub."""

import base64
import json
import os
import shutil
import sys
import types

import pytest
import torch
from helpers import (
    TokenDataset,
    l2_args,
    params_of,
    save_tiny_gpt2,
    save_tiny_marian,
    tiny_gpt2,
    write_text_files,
    write_translation_files,
)
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import _http, set_client_factory
from huggingface_hub.utils._http import default_client_factory
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from hf_l2 import HubPublishError, L2Trainer
from hf_l2.publishing.card import PLOT_FILE
from hf_l2.tools.cli import main as hf_l2_main
from hf_l2.tools.recipe_common import load_recipe

TOKEN = "hf_test_token"
# The HTTP library huggingface_hub talks through: httpx in 1.x, httpx2 (the same API) in 2.x.
httpx = getattr(_http, "httpx2", None) or _http.httpx


class FakeHub:
    """The Hub's HTTP API as far as `create_repo` and `upload_folder` use it; records what it is sent.

    `fail`: None, "offline" (the connection fails) or an HTTP status, answered to every API call whose path
    contains `fail_on` (all of them by default).
    `watch(folder)`: note the files in `folder` when the first request arrives.
    """

    def __init__(self):
        self.fail, self.fail_on = None, "/"
        self.requests, self.created, self.commits = [], [], []
        self.validated_cards = []
        self._watched, self.files_at_first_request = None, None

    def watch(self, folder):
        self._watched, self.files_at_first_request = folder, None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/agent-harnesses":  # huggingface_hub's environment probe, not a Hub call we make
            return httpx.Response(404)
        if self._watched and self.files_at_first_request is None:
            self.files_at_first_request = set(os.listdir(self._watched))
        self.requests.append((request.method, path, request.headers.get("authorization")))
        failing = self.fail is not None and self.fail_on in path
        if failing and self.fail == "offline":
            raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
        if failing:
            refusal = {"error": "refused", "errors": [{"message": "refused"}]}
            return httpx.Response(self.fail, json=refusal, headers={"X-Error-Message": "refused"})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body.get('organization') or 'alice'}/{body['name']}"
            # huggingface_hub 2.x sends `visibility`, 1.x `private`
            self.created.append((repo_id, body.get("visibility") or ("private" if body.get("private") else None)))
            return httpx.Response(200, json={"url": f"https://huggingface.co/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            content = json.loads(request.content)["content"]
            self.validated_cards.append(content)
            ModelCard(content)  # the fake checks what it can offline: the header parses as model card metadata
            return httpx.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]  # small files: all sent inline in the commit
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx.Response(200, json={"files": modes})
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.splitlines()]
            files = {op["value"]["path"]: base64.b64decode(op["value"]["content"])
                     for op in lines if op["key"] == "file"}
            repo_id, revision = path.removeprefix("/api/models/").split("/commit/")
            self.commits.append({"repo_id": repo_id, "revision": revision, "files": files})
            return httpx.Response(200, json={"commitUrl": f"https://huggingface.co/{repo_id}/commit/{'a' * 40}",
                                              "commitOid": "a" * 40, "commitMessage": lines[0]["value"]["summary"]})
        return httpx.Response(404, json={"error": f"the fake Hub does not serve {path}"})


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def client():
        stock = default_client_factory()  # keep its request hooks (offline mode, request ids); swap the network
        hooks = stock.event_hooks
        stock.close()
        return httpx.Client(transport=httpx.MockTransport(hub), event_hooks=hooks, follow_redirects=True)

    set_client_factory(client)
    yield hub
    set_client_factory(default_client_factory)


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = "[PAD] [UNK] the a model is small and fine tuned".split()
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    assert tokenizer("the model is small")["input_ids"] == [2, 4, 5, 6]
    return tokenizer


def local_files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files}


def test_push_to_hub_sends_model_tokenizer_card_and_plot_after_saving_them(tmp_path, fake_hub):
    out = tmp_path / "out"
    args = l2_args(out, push_to_hub=True, hub_model_id="alice/tiny-l2sp", hub_private_repo=True, hub_strategy="end",
                   save_strategy="steps", save_steps=2, l2_coef=1.0, l2_kl_coef=0.5)
    trainer = L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(),
                        eval_dataset=TokenDataset(n=4, seed=3), processing_class=word_tokenizer())
    # Built with push_to_hub=True, the trainer creates the repo before training: a bad token stops it right there.
    assert fake_hub.created == [("alice/tiny-l2sp", "private")] and trainer.hub_model_id == "alice/tiny-l2sp"
    trainer.train()
    trainer.evaluate()

    fake_hub.watch(out)
    commit = trainer.push_to_hub(dataset_tags="wikitext", language="en", license="apache-2.0")
    wanted = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md", PLOT_FILE}
    assert wanted <= fake_hub.files_at_first_request  # all of it was on disk before the Hub was asked anything
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in fake_hub.requests)

    (sent,) = fake_hub.commits
    assert (sent["repo_id"], sent["revision"]) == ("alice/tiny-l2sp", "main")
    on_disk = local_files(out)
    assert {"checkpoint-2/model.safetensors", "checkpoint-4/l2_anchor.safetensors"} <= on_disk
    assert {"l2_anchor.safetensors", "l2_kl_anchor.safetensors"} <= on_disk  # θ₀ stays beside the weights, off the Hub
    unsent = ("checkpoint-", "l2_anchor", "l2_kl_anchor", "training_args.bin")  # the last holds the token
    assert set(sent["files"]) == {f for f in on_disk if not f.startswith(unsent)}
    assert wanted <= set(sent["files"])
    for name in ("README.md", PLOT_FILE, "model.safetensors"):
        assert sent["files"][name] == (out / name).read_bytes()
    # The card the Hub was asked to validate is the one on disk (huggingface_hub 1.x asks more than once).
    assert fake_hub.validated_cards and set(fake_hub.validated_cards) == {(out / "README.md").read_text()}
    assert commit.commit_url.startswith("https://huggingface.co/alice/tiny-l2sp/commit/")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained run whose trainer has push_to_hub=False (building it needs no Hub) and its weights."""
    out = tmp_path_factory.mktemp("run")
    trainer = L2Trainer(model=tiny_gpt2(), args=l2_args(out, max_steps=2, l2_coef=1.0, hub_model_id="alice/tiny"),
                        train_dataset=TokenDataset(), processing_class=word_tokenizer())
    trainer.train()
    return trainer, out, params_of(trainer.model)


@pytest.mark.parametrize(
    "failure, fail_on, said",
    [
        ("offline", "/", "could not reach https://huggingface.co (ConnectError"),
        (401, "/", "the Hub rejected the token (401 Unauthorized): it is invalid or expired.\nTo fix it: create a"),
        (403, "/", "the token may not write to 'alice/tiny' (403 Forbidden)"),
        (400, "/api/validate-yaml", "the Hub rejected the model card's metadata (Invalid metadata in README.md."),
        ("no token", "/", "no Hugging Face token was found.\nTo fix it: create a token with write access"),
    ],
)
def test_a_failed_push_says_what_to_do_and_keeps_the_output(trained, fake_hub, monkeypatch, failure, fail_on, said):
    trainer, out, weights = trained
    if failure == "no token":
        monkeypatch.delenv("HF_TOKEN")
    else:
        fake_hub.fail, fake_hub.fail_on = failure, fail_on
    with pytest.raises(HubPublishError) as caught:
        trainer.push_to_hub()
    message = str(caught.value)
    assert message.startswith(f"Pushing to the Hugging Face Hub failed: {said}")
    assert f"Nothing is lost: the model, tokenizer, card and plot are saved in {out}" in message
    assert message.endswith(f"hf-l2 push {out} --repo-id alice/tiny")
    if failure == "no token":
        assert fake_hub.requests == []  # told before anything is sent

    reloaded = GPT2LMHeadModel.from_pretrained(out)
    assert all(torch.equal(reloaded.state_dict()[n], w) for n, w in weights.items())
    assert PreTrainedTokenizerFast.from_pretrained(out)("the model")["input_ids"] == [2, 4]
    assert ModelCard.load(out / "README.md").data.tags[:2] == ["hf_l2", "l2-sp"]
    assert (out / PLOT_FILE).is_file()


def test_a_push_in_the_background_fails_through_its_future(trained, fake_hub):
    trainer, _, _ = trained
    fake_hub.fail = 401
    future = trainer.push_to_hub(blocking=False)
    assert isinstance(future.exception(timeout=60), HubPublishError)


def test_an_unreachable_hub_stops_a_push_to_hub_run_before_training(tmp_path, fake_hub):
    fake_hub.fail = "offline"
    with pytest.raises(HubPublishError, match="could not reach(.|\n)*Nothing has been trained yet"):
        L2Trainer(model=tiny_gpt2(), args=l2_args(tmp_path, push_to_hub=True, hub_model_id="alice/x"))


def test_cli_publishes_a_saved_run_later(trained, fake_hub, tmp_path, capsys):
    trainer, out, _ = trained
    trainer.save_model()

    assert hf_l2_main(["push", str(out), "--repo-id", "bob/later", "--private"]) == 0
    assert fake_hub.created == [("bob/later", "private")]
    (sent,) = fake_hub.commits
    assert sent["repo_id"] == "bob/later"
    assert {"model.safetensors", "tokenizer.json", "README.md", PLOT_FILE} <= set(sent["files"])
    assert "https://huggingface.co/bob/later/commit/" in capsys.readouterr().out

    fake_hub.fail = 401
    assert hf_l2_main(["push", str(out), "--repo-id", "bob/later"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Pushing to the Hugging Face Hub failed: the Hub rejected the token")
    assert "Traceback" not in err

    fake_hub.requests.clear()
    assert hf_l2_main(["push", str(tmp_path), "--repo-id", "bob/later"]) == 2
    assert "is not a finished model to publish: no config.json" in capsys.readouterr().err
    assert fake_hub.requests == []


# ---- the recipes --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_inputs")
    return {"gpt2": save_tiny_gpt2(root / "gpt2"), "text": write_text_files(root / "text"),
            "marian": save_tiny_marian(root / "marian"), "pairs": write_translation_files(root / "pairs")}


def recipe_command(recipe, inputs, out, *extra):
    """`python recipes/<recipe>.py ...` as this process's command line, for the recipe's own entry point `run`."""
    if recipe == "gpt2_generation":
        data = ["--model_name_or_path", str(inputs["gpt2"]), "--train_file", str(inputs["text"]["txt"]),
                "--validation_file", str(inputs["text"]["validation"]), "--block_size", "32", "--max_new_tokens", "4"]
    else:
        data = ["--model_name_or_path", str(inputs["marian"]), "--train_file", str(inputs["pairs"]["train"]),
                "--validation_file", str(inputs["pairs"]["validation"]), "--max_source_length", "16",
                "--max_target_length", "16"]
    return [f"recipes/{recipe}.py", *data, "--output_dir", str(out), "--max_steps", "2", "--num_samples", "1",
            "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", "--l2_coef", "0.1", "--push_to_hub", "true", "--hub_model_id", "alice/tiny",
            "--hub_strategy", "end", *extra]


def run_recipe(monkeypatch, recipe, argv):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    module = load_recipe(recipe)
    module.run(module.main)


@pytest.mark.parametrize("recipe, samples", [("gpt2_generation", "samples.jsonl"),
                                             ("marian_translation", "translations.jsonl")])
def test_recipes_push_model_tokenizer_card_and_plot(recipe_inputs, fake_hub, tmp_path, monkeypatch, recipe, samples):
    out = tmp_path / "run"
    run_recipe(monkeypatch, recipe, recipe_command(recipe, recipe_inputs, out, "--hub_private_repo", "true"))

    assert fake_hub.created[0] == ("alice/tiny", "private")
    assert len(fake_hub.commits) == 1  # one push, at the end, after the local save of everything
    final = fake_hub.commits[-1]
    assert final["repo_id"] == "alice/tiny"
    # θ₀ stays local, and so do the pickled training arguments (they hold the token)
    assert set(final["files"]) == {f for f in local_files(out) if not f.startswith("l2_anchor")} - {"training_args.bin"}
    assert {"model.safetensors", "tokenizer_config.json", "README.md", PLOT_FILE, samples, "all_results.json"} <= set(
        final["files"])
    card = ModelCard(final["files"]["README.md"].decode())
    assert card.data.tags[:2] == ["hf_l2", "l2-sp"] and card.data.library_name == "transformers"
    assert f"python recipes/{recipe}.py --model_name_or_path" in card.text
    assert "| eval_loss |" in card.text and "| all |" in card.text


def test_the_hub_token_reaches_no_uploaded_file(recipe_inputs, fake_hub, tmp_path, monkeypatch):
    """Given on the command line and in the config file, the token is used to push but written into nothing that
    is uploaded: not the card's command, not the copied config file, not `training_args.bin`."""
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("hub_token: hf_FROM_THE_FILE\nl2_mode: l2_sp\n")
    argv = recipe_command("gpt2_generation", recipe_inputs, out, "--hub_token", "hf_ON_THE_COMMAND_LINE")
    run_recipe(monkeypatch, "gpt2_generation", [argv[0], str(config), *argv[1:]])

    hub_calls = [auth for _, path, auth in fake_hub.requests if path.startswith("/api/")]
    assert hub_calls and all(auth == "Bearer hf_ON_THE_COMMAND_LINE" for auth in hub_calls)
    uploaded = fake_hub.commits[-1]["files"]
    assert "README.md" in uploaded and "reproduce/run.yaml" in uploaded
    for secret in (b"hf_ON_THE_COMMAND_LINE", b"hf_FROM_THE_FILE"):
        assert [name for name, content in uploaded.items() if secret in content] == []
    assert "training_args.bin" in local_files(out)  # the stock Trainer's; kept locally, never uploaded


@pytest.mark.parametrize("fail, fail_on, cause, after", [
    (401, "/api/repos/create", "the Hub rejected the token (401", "Nothing has been trained yet"),
    ("offline", "/api/validate-yaml", "could not reach", "Nothing is lost: the model, tokenizer, card and plot"),
])
def test_a_recipe_whose_push_fails_ends_with_one_message(recipe_inputs, fake_hub, tmp_path, monkeypatch,
                                                         fail, fail_on, cause, after):
    """Refused when the repo is created (before training), or the network gone at the upload (after training)."""
    out = tmp_path / "run"
    fake_hub.fail, fake_hub.fail_on = fail, fail_on
    with pytest.raises(SystemExit) as caught:
        run_recipe(monkeypatch, "gpt2_generation", recipe_command("gpt2_generation", recipe_inputs, out))
    message = str(caught.value.code)
    assert message.startswith(f"error: Pushing to the Hugging Face Hub failed: {cause}") and after in message
    trained = fail == "offline"
    assert (out / "model.safetensors").is_file() == trained and (out / "README.md").is_file() == trained


# ---- hf-l2 push on an incomplete run --------------------------------------------------------------------------
def saved_run(trained, tmp_path):
    trainer, out, _ = trained
    trainer.save_model()
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    return copy


def cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, said", [
    (lambda run: cut_short(run / "model.safetensors"),
     "no readable model weights: model.safetensors (unreadable, truncated or corrupted"),
    (lambda run: (run / "config.json").unlink(), "no config.json (or adapter_config.json)"),
    (lambda run: (run / "model.safetensors").unlink(), "no readable model weights: model weights (none of"),
])
def test_cli_refuses_an_incomplete_run_before_asking_the_hub(trained, fake_hub, tmp_path, capsys, damage, said):
    run = saved_run(trained, tmp_path)
    damage(run)
    capsys.readouterr()  # the save's progress bars
    assert hf_l2_main(["push", str(run), "--repo-id", "bob/later"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf-l2 push: {run} is not a finished model to publish: ") and said in err
    assert err.count("\n") == 1 and fake_hub.requests == []


def test_cli_refuses_a_sharded_model_missing_a_shard(trained, fake_hub, tmp_path, capsys):
    run = saved_run(trained, tmp_path)
    trainer, _, _ = trained
    (run / "model.safetensors").unlink()
    trainer.model.save_pretrained(run, max_shard_size="5KB")
    shards = sorted(run.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    capsys.readouterr()
    assert hf_l2_main(["push", str(run), "--repo-id", "bob/later"]) == 2
    assert f"{shards[1].name} (missing)" in capsys.readouterr().err and fake_hub.requests == []


def test_cli_refuses_a_checkpoint_folder(trained, fake_hub, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(saved_run(trained, tmp_path), checkpoint)  # a whole model, but a checkpoint by its name
    assert hf_l2_main(["push", str(checkpoint), "--repo-id", "bob/later"]) == 2
    assert "it is a checkpoint folder (it holds training state" in capsys.readouterr().err
    assert fake_hub.requests == []


def test_cli_warns_about_a_missing_tokenizer_and_pushes_the_model(trained, fake_hub, tmp_path, capsys):
    run = saved_run(trained, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (run / name).unlink()
    capsys.readouterr()
    assert hf_l2_main(["push", str(run), "--repo-id", "bob/later"]) == 0
    assert "hf-l2 push: warning: no tokenizer (tokenizer_config.json)" in capsys.readouterr().err
    (sent,) = fake_hub.commits
    assert {"model.safetensors", "config.json"} <= set(sent["files"]) and "tokenizer.json" not in sent["files"]


def test_a_failed_push_names_only_what_is_saved(trained, fake_hub, tmp_path, capsys):
    """A folder without tokenizer and plot: the message must not tell that they are saved."""
    run = saved_run(trained, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", PLOT_FILE):
        (run / name).unlink()
    fake_hub.fail = 401
    capsys.readouterr()
    assert hf_l2_main(["push", str(run), "--repo-id", "bob/later"]) == 1
    assert f"Nothing is lost: the model and card are saved in {run}." in capsys.readouterr().err
