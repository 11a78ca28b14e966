"""hf_l2: fine-tune Hugging Face models with an explicit L2 or L2-SP penalty (Li, Grandvalet & Davoine, ICML 2018)."""

from hf_l2 import _quiet  # noqa: F401 - first: before anything imports peft
from hf_l2._version import __version__
from hf_l2.callbacks import DecoupledL2SPCallback, WeightNormCallback
from hf_l2.config import L2Config, L2Seq2SeqConfig
from hf_l2.penalty import L2Penalty
from hf_l2.publishing.hub import HubPublishError
from hf_l2.publishing.mixin import L2PublishingMixin
from hf_l2.schedule import CoefSchedule
from hf_l2.trainer import L2PenaltyMixin, L2TokenLossMixin
from hf_l2.trainers import L2Seq2SeqTrainer, L2Trainer, L2TrainerMixin

__all__ = [
    "__version__",
    "L2Config",
    "L2Seq2SeqConfig",
    "L2Trainer",
    "L2Seq2SeqTrainer",
    "L2TrainerMixin",
    "L2PenaltyMixin",
    "L2TokenLossMixin",
    "L2PublishingMixin",
    "WeightNormCallback",
    "DecoupledL2SPCallback",
    "CoefSchedule",
    "L2Penalty",
    "HubPublishError",
]
