"""The trainers users import: the Trainer layer's mixins (`hf_l2.trainer`) with the card and Hub publishing
(`hf_l2.publishing`) on a transformers trainer. The one core module that reaches into a wing: it assembles them."""

from __future__ import annotations

from transformers import Seq2SeqTrainer, Trainer

from hf_l2.config import L2Seq2SeqConfig
from hf_l2.publishing.mixin import L2PublishingMixin
from hf_l2.trainer import L2TokenLossMixin


class L2TrainerMixin(L2TokenLossMixin, L2PublishingMixin):
    """The penalty and the card / Hub publishing for any `Trainer` subclass: `class X(L2TrainerMixin, SomeTrainer)`.

    `args` must be an [`L2Config`] (or a config that extends it).
    """


class L2Trainer(L2TrainerMixin, Trainer):
    """[`~transformers.Trainer`] that fine-tunes with an explicit L2 or L2-SP penalty; see [`L2Config`]."""


class L2Seq2SeqTrainer(L2TrainerMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] with the penalty of [`L2Trainer`]; takes an [`L2Seq2SeqConfig`]."""

    default_config = L2Seq2SeqConfig
