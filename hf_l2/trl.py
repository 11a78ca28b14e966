"""TRL's trainers with the L2 / L2-SP penalty: `L2SFTTrainer` / `L2SFTConfig`, `L2DPOTrainer` / `L2DPOConfig`.

Any other TRL trainer (or `Trainer` subclass) composes the same way, in two lines::

    @dataclasses.dataclass
    class L2KTOConfig(KTOConfig, L2Config): ...        # this base order keeps KTOConfig's defaults

    class L2KTOTrainer(L2TRLMixin, KTOTrainer): ...     # the mixin first, so its hooks wrap the trainer's

The penalty is the one of `hf_l2.L2Trainer` (same `l2_*` fields, same hooks), applied to the trainer's own loss:
TRL's losses, batching, packing, PEFT wrapping and `_metrics` logging are untouched. Needs TRL (`hf_l2[trl]`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os

try:
    import trl
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as error:  # importing `hf_l2` itself never needs TRL
    raise ImportError("`hf_l2.trl` needs TRL: install it with `pip install 'hf_l2[trl]'`.") from error

from huggingface_hub import ModelCard
from transformers import TrainingArguments

from .config import L2Config
from .model_card import CARD_FILE, CardInfo
from .trainer import L2PenaltyMixin, L2TrainerMixin

__all__ = ["L2TRLMixin", "L2SFTConfig", "L2SFTTrainer", "L2DPOConfig", "L2DPOTrainer"]

# TRL's own citation (https://github.com/huggingface/trl#citation), for the cards of runs it trained.
TRL_CITATION = """@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan
             and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""


class L2TRLMixin(L2TrainerMixin):  # the one place hf_l2.trl names hf_l2's trainer mixin
    """hf_l2's penalty for a TRL trainer: `class L2XTrainer(L2TRLMixin, XTrainer)`, with `args` an `L2XConfig`
    declared as `@dataclasses.dataclass class L2XConfig(XConfig, L2Config)`.

    On top of [`L2TrainerMixin`] it refuses, before the trainer is built, a config class whose base order silently
    replaced the TRL config's defaults by the stock Trainer's; and the model card (hf_l2's, which replaces TRL's)
    keeps TRL's tags and adds which TRL trainer ran and its citations. `create_model_card` and `push_to_hub` also
    take TRL's `dataset_name` (a Hub dataset id). The output anchor (`l2_kl_coef`) is refused except where a
    trainer says where its logits come from (`L2SFTTrainer`).
    """

    _l2_kl_logits = None

    def __init__(self, *args, **kwargs):
        config = _bound_arguments(type(self), args, kwargs).get("args")
        if config is not None:
            check_config_class(type(config))
        super().__init__(*args, **kwargs)

    def create_model_card(self, *args, dataset_name: str | list[str] | None = None, **kwargs) -> None:
        """hf_l2's card (see `L2PublishingMixin.create_model_card`); TRL's `dataset_name` counts as `dataset_tags`."""
        if dataset_name is not None and kwargs.get("dataset_tags") is None:
            kwargs["dataset_tags"] = dataset_name
        super().create_model_card(*args, **kwargs)

    def _write_model_card(self, output_dir: str, info: CardInfo) -> None:
        super()._write_model_card(output_dir, info)
        if self.is_world_process_zero():
            add_trl_section(os.path.join(output_dir, CARD_FILE), self)


def _bound_arguments(trainer_cls: type, args: tuple, kwargs: dict) -> dict:
    """The arguments by name, as the first `__init__` after hf_l2's mixins (the TRL trainer's) will receive them."""
    init = next(
        c.__dict__["__init__"] for c in trainer_cls.__mro__
        if "__init__" in c.__dict__ and not issubclass(c, L2PenaltyMixin)
    )
    try:
        return inspect.signature(init).bind_partial(None, *args, **kwargs).arguments
    except TypeError:  # let the trainer itself report a wrong call
        return {}


def check_config_class(config_cls: type) -> None:
    """Refuse an L2 config class that is not a dataclass of its own, or that lost its TRL base's defaults.

    `class C(L2Config, SFTConfig)` builds without a word, but dataclass fields are collected along the MRO, so
    L2Config's copies of the `TrainingArguments` fields (the stock defaults) win over SFTConfig's.
    """
    if not issubclass(config_cls, L2Config):
        return  # `L2PenaltyMixin` says what `args` must be
    if "l2_mode" not in {f.name for f in dataclasses.fields(config_cls)}:
        raise TypeError(
            f"`{config_cls.__name__}` is not a dataclass of its own, so it has no `l2_*` fields: decorate it with "
            "`@dataclasses.dataclass`."
        )
    base = next(
        (c for c in config_cls.__mro__ if issubclass(c, TrainingArguments) and not issubclass(c, L2Config)),
        TrainingArguments,
    )
    stock = {f.name: _default(f) for f in dataclasses.fields(L2Config)}
    lost = [
        f.name for f in dataclasses.fields(base)
        if f.name in stock and _default(f) != stock[f.name]
        and _default(config_cls.__dataclass_fields__[f.name]) == stock[f.name]
    ]
    if lost:
        raise TypeError(
            f"`{config_cls.__name__}` takes the stock Trainer's defaults of {lost[:5]} instead of "
            f"`{base.__name__}`'s: list the TRL config first, `class {config_cls.__name__}({base.__name__}, L2Config)`."
        )


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_trl_section(card_path: str, trainer) -> None:
    """Add the TRL trainer's tags to the card's metadata and a section naming it, with its and TRL's citations."""
    card = ModelCard.load(card_path)
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in trainer._tag_names if t not in tags]
    name = getattr(trainer, "_name", type(trainer).__name__)
    paper = getattr(trainer, "_paper", None) or {}
    method = ""
    if paper.get("id"):
        method = f", the method of [{paper['title']}](https://huggingface.co/papers/{paper['id']})"
    lines = [
        "## Trained with TRL",
        "",
        f"The training loop was [TRL](https://github.com/huggingface/trl)'s {name} trainer (TRL {trl.__version__})"
        f"{method}, with hf_l2's penalty (see Regularization) added to its loss.",
        "",
    ]
    if paper.get("citation"):
        lines += [f"Cite {name} as:", "", "```bibtex", paper["citation"].strip(), "```", ""]
    lines += ["Cite TRL as:", "", "```bibtex", TRL_CITATION, "```", ""]
    card.text = card.text.rstrip() + "\n\n" + "\n".join(lines)
    card.save(card_path)


@dataclasses.dataclass
class L2SFTConfig(SFTConfig, L2Config):
    """[`trl.SFTConfig`] (with its defaults) plus the `l2_*` fields of [`hf_l2.L2Config`]."""


class L2SFTTrainer(L2TRLMixin, SFTTrainer):
    """[`trl.SFTTrainer`] that fine-tunes with an explicit L2 or L2-SP penalty; takes an [`L2SFTConfig`].

    With `peft_config`, θ₀ is taken from the wrapped model (the LoRA factors as initialized); `l2_lora_delta=True`
    penalizes each adapted layer's weight change instead. `l2_kl_coef` projects the hidden states TRL's fused LM
    head sees.
    """

    _l2_kl_logits = "backbone"  # TRL's SFT loss never builds the logits


@dataclasses.dataclass
class L2DPOConfig(DPOConfig, L2Config):
    """[`trl.DPOConfig`] (with its defaults) plus the `l2_*` fields of [`hf_l2.L2Config`]."""


class L2DPOTrainer(L2TRLMixin, DPOTrainer):
    """[`trl.DPOTrainer`] with the penalty on the policy (the reference model is never penalized nor trained);
    takes an [`L2DPOConfig`]."""
