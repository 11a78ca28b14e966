"""Publishing a saved run to the Hugging Face Hub, with every Hub failure turned into one message that says what to do.

Nothing here writes to the local folder: callers save the model, tokenizer, card and plot first, so a failed push
loses nothing and `hf-l2 push OUTPUT_DIR --repo-id ...` can publish the same folder later.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import CommitInfo, HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled

from hf_l2._version import __version__
from hf_l2.saved_state import SAVED_STATE_GLOBS

# What the Trainer leaves out of its own pushes: private files and intermediate checkpoints.
# θ₀ (the penalty's and the KL's) and F, as large as the model each, stay local: the Hub has the base model, and
# `hf-l2 interpolate` reads them. `training_args.bin` is the pickled TrainingArguments, `hub_token` included.
UPLOAD_IGNORE_PATTERNS = ["_*", "checkpoint-*", *SAVED_STATE_GLOBS, "training_args.bin"]


class HubPublishError(RuntimeError):
    """The Hub could not be reached or refused the push; the message says what failed and what to do.

    Raised only after the local save is complete: the output folder is intact and can be pushed again later.
    """


def _api() -> HfApi:
    return HfApi(library_name="hf_l2", library_version=__version__)


def ensure_repo(repo_id: str, *, token: str | None = None, private: bool | None = None) -> str:
    """Create the model repo unless it exists, before training (no output yet), and return its full id."""
    with hub_errors(repo_id, saved_in=None):
        _require_token(token)
        return _api().create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id


def upload_run(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload fine-tuned model with hf_l2",
    revision: str | None = None,
) -> CommitInfo:
    """Create the repo if needed and upload a saved run folder (model, tokenizer, card, plot; no checkpoints)."""
    with hub_errors(repo_id, saved_in=folder):
        _require_token(token)
        api = _api()
        repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            token=token,
            revision=revision,
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
        )


def _require_token(token: str | None) -> None:
    # Without a token the Hub answers 401 like it does for a wrong one; say which it is before asking it.
    if token is None and get_token() is None:
        raise LocalTokenNotFoundError("no Hugging Face token")


@contextmanager
def hub_errors(repo_id: str, saved_in: str | None) -> Iterator[None]:
    """Re-raise any failure of the Hub calls inside as a `HubPublishError` with the cause and the fix in words."""
    try:
        yield
    except HubPublishError:
        raise
    except Exception as err:
        what, fix = _diagnose(err, repo_id)
        if saved_in is None:
            after = (
                "Nothing has been trained yet. Fix this and start again, or drop --push_to_hub and publish the "
                "finished run with: hf-l2 push OUTPUT_DIR --repo-id " + repo_id
            )
        else:
            after = (
                f"Nothing is lost: {_saved_parts(saved_in)} saved in {saved_in}. Once fixed, publish them with: "
                f"hf-l2 push {saved_in} --repo-id {repo_id}"
            )
        raise HubPublishError(f"Pushing to the Hugging Face Hub failed: {what}.\nTo fix it: {fix}.\n{after}") from err


# What a saved run holds, by the file that shows it is there (the card's plot: model_card.PLOT_FILE).
_SAVED_PARTS = {"model": ("config.json", "adapter_config.json"), "tokenizer": ("tokenizer_config.json",),
                "card": ("README.md",), "plot": ("l2_training.png",)}


def _saved_parts(folder: str) -> str:
    """"the model, tokenizer, card and plot are" (those of them that are in ``folder``)."""
    found = [part for part, files in _SAVED_PARTS.items() if any(os.path.isfile(os.path.join(folder, f))
                                                                  for f in files)]
    if not found:
        return "the files are"
    words = found[0] if len(found) == 1 else ", ".join(found[:-1]) + " and " + found[-1]
    return f"the {words} {'is' if len(found) == 1 else 'are'}"


def _diagnose(err: Exception, repo_id: str) -> tuple[str, str]:
    """(what failed, what to do) for the errors `huggingface_hub` raises on create_repo / upload_folder."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    login = "create a token with write access at https://huggingface.co/settings/tokens, then run `hf auth login`"
    if isinstance(err, LocalTokenNotFoundError):
        return "no Hugging Face token was found", f"{login}, set HF_TOKEN, or pass --hub_token (hf-l2 push: --token)"
    if isinstance(err, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE"
    if isinstance(err, HFValidationError):
        return f"{repo_id!r} is not a valid repo id", "use 'name' or 'user-or-org/name' (letters, digits, - _ .)"
    if status == 401:
        return "the Hub rejected the token (401 Unauthorized): it is invalid or expired", login
    if status == 403:
        return (
            f"the token may not write to {repo_id!r} (403 Forbidden)",
            "use a token with write access to that user or organization, or a repo id in your own namespace",
        )
    if status == 404:
        return (
            f"{repo_id!r} or the requested branch was not found (404)",
            (
                "check the repo id and the branch (--hub_revision, or --revision for hf-l2 push); a branch must "
                "exist before pushing to it"
            ),
        )
    if isinstance(err, ValueError) and "README.md" in str(err):  # the Hub's validation of the card's YAML header
        return f"the Hub rejected the model card's metadata ({err})", "correct the YAML header of README.md"
    if status is not None:
        return f"the Hub answered {status} ({err})", "try again later, and check https://status.huggingface.co"
    # huggingface_hub raises httpx's TransportError family (not OSError) when the network is down.
    if isinstance(err, (ConnectionError, TimeoutError)) or any(
        cls.__name__ == "TransportError" for cls in type(err).__mro__
    ):
        return (
            f"could not reach {constants.ENDPOINT} ({type(err).__name__}: {err})",
            "check the network connection, proxy settings (HTTPS_PROXY) or HF_ENDPOINT",
        )
    return f"{type(err).__name__}: {err}", "remove the cause named here and push again"
