"""`L2PublishingMixin`: the trainer's model card and Hub push, in the order that loses nothing.

The stock `Trainer` pushes from inside `save_model` before any card exists, and creates the repo only when pushing.
Here the card and its plot are written beside the weights first and the upload starts only once all is on disk;
the repo is created when the trainer is built, so a bad token fails before any training. Hub failures become one
`HubPublishError` (see `hf_l2.publishing.hub`). With `l2_mode="none"` the stock Trainer's methods run instead (that mode
promises the stock Trainer's files): hf_l2's card is written only when the user calls `create_model_card`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from huggingface_hub import HfApi

from hf_l2.publishing.card import CardInfo, measure_penalty, write_model_card
from hf_l2.publishing.hub import ensure_repo, upload_run


class L2PublishingMixin:
    """Card and Hub publishing for a `Trainer` subclass that also has [`L2PenaltyMixin`] (see `L2TrainerMixin`)."""

    _card_info: CardInfo | None = None  # what `create_model_card` was told, for the cards written after it
    _stock_card = False  # set while the stock `push_to_hub` of `l2_mode="none"` runs: it writes the stock card

    def create_model_card(self, *args, **kwargs) -> None:
        """Write the L2 model card (`README.md`) and its plot (`l2_training.png`) into `output_dir`.

        Replaces the stock card; takes the fields of `hf_l2.publishing.card.CardInfo` (positionally in the stock
        method's order, or by name): the stock ones plus `command`, the command line to record (default: this
        process's). Values given here are kept for the cards that `save_model()` and `push_to_hub()` write later.
        Call it on every process (as the Trainer's own calls are): under FSDP / ZeRO-3 the drift statistics are
        summed across them.
        """
        if self._stock_card:
            kwargs.pop("command", None)  # hf_l2's own field, which the stock card does not take
            return super().create_model_card(*args, **kwargs)
        info = (self._card_info or CardInfo()).updated(CardInfo(*args, **kwargs))
        self._write_model_card(self.args.output_dir, info)
        self._card_info = info

    def _write_model_card(self, output_dir: str, info: CardInfo) -> None:
        terms = self.bound_l2_terms()
        measurement = measure_penalty(terms.penalty, terms.lora)  # on every process: a collective under FSDP / ZeRO-3
        if self.is_world_process_zero():
            write_model_card(self, output_dir, measurement, info)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model and tokenizer; called by the user, also the card and plot, then push if `push_to_hub`.

        The stock method would push before the card exists; here the upload starts only once all is on disk.
        `_internal_call=True` (the Trainer's own saves: checkpoints, `save_weights`) saves the weights alone.
        """
        if not self.args.l2_enabled or _internal_call:
            return super().save_model(output_dir, _internal_call)
        self.save_weights(output_dir)  # `L2PenaltyMixin`'s: the weights and θ₀, no card, no push
        self._write_model_card(output_dir or self.args.output_dir, self._card_info or CardInfo())
        if self.args.push_to_hub:
            self._upload_output_dir("Model save")

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save model, tokenizer, card and plot in `output_dir`, then upload it to `hub_model_id`.

        Nothing is sent before the local save is complete. A Hub failure (no network, missing or invalid token,
        repo errors) raises one `hf_l2.HubPublishError` saying what to do, with the local output intact (with
        `blocking=False`, from the returned future). `kwargs` go to `create_model_card`.
        """
        if not self.args.l2_enabled:
            self._stock_card = True
            try:
                return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
            finally:
                self._stock_card = False
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        # Both on every process: gathering a sharded model, and the card's statistics, need all of them.
        self.save_weights()
        self.create_model_card(**kwargs)
        return self._upload_output_dir(commit_message, blocking, token, revision, private)

    def _upload_output_dir(self, commit_message, blocking=True, token=None, revision=None, private=None):
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()  # a checkpoint upload still running would race with this one
        upload = functools.partial(
            upload_run,
            self.args.output_dir,
            self.hub_model_id or self._hub_repo_name(),
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message or "End of training",
            revision=revision or self.args.hub_revision,
        )
        return upload() if blocking else HfApi().run_as_future(upload)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo. With `push_to_hub=True` the Trainer calls this when it is built, so a missing or
        invalid token or an unreachable Hub stops the run before any training, with one `HubPublishError`."""
        if not self.args.l2_enabled:
            return super().init_hf_repo(token, private)
        if not self.is_world_process_zero():
            return
        self.hub_model_id = ensure_repo(
            self._hub_repo_name(),
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
        )
        self.push_in_progress = None

    def _hub_repo_name(self) -> str:
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name
