"""hf_l2: fine-tune Hugging Face models with an explicit L2 or L2-SP penalty (Li, Grandvalet & Davoine, ICML 2018)."""

from . import _quiet  # noqa: F401 - first: before anything imports peft
from ._version import __version__
from .callbacks import DecoupledL2SPCallback, WeightNormCallback
from .config import L2Config, L2Seq2SeqConfig
from .hub import HubPublishError
from .penalty import L2Penalty
from .publishing import L2PublishingMixin
from .schedule import CoefSchedule
from .trainer import L2OutputAnchorMixin, L2PenaltyMixin, L2Seq2SeqTrainer, L2Trainer, L2TrainerMixin

__all__ = [
    "L2Config",
    "L2Seq2SeqConfig",
    "L2Trainer",
    "L2Seq2SeqTrainer",
    "L2TrainerMixin",
    "L2PenaltyMixin",
    "L2OutputAnchorMixin",
    "L2PublishingMixin",
    "WeightNormCallback",
    "DecoupledL2SPCallback",
    "CoefSchedule",
    "L2Penalty",
    "HubPublishError",
]
