"""TRL's trainers with the L2 / L2-SP penalty: `L2SFTTrainer` / `L2SFTConfig`, `L2DPOTrainer` / `L2DPOConfig`.

Any other TRL trainer composes the same way, in one line::

    class L2KTOTrainer(L2TRLMixin, KTOTrainer): ...     # the mixin first, so its hooks wrap the trainer's

    from hf_l2.integrations.trl import L2KTOConfig   # = @dataclasses.dataclass class L2KTOConfig(KTOConfig, L2Config)

`hf_l2.integrations.trl.L2<X>Config` is made on first use for any TRL config `<X>Config` (this base order keeps its
defaults); a trainer built without `args` gets its own, as TRL's trainers do. A config declared by hand works the same.

The penalty is the one of `hf_l2.L2Trainer` (same `l2_*` fields, same hooks), applied to the trainer's own loss:
TRL's losses, batching, packing, PEFT wrapping and `_metrics` logging are untouched. Needs TRL (`hf_l2[trl]`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing

try:
    import trl
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as error:  # importing `hf_l2` itself never needs TRL
    raise ImportError("`hf_l2.integrations.trl` needs TRL: install it with `pip install 'hf_l2[trl]'`.") from error

from huggingface_hub import ModelCard
from transformers import TrainingArguments

from hf_l2.config import L2Config
from hf_l2.publishing.card import CARD_FILE, CardInfo
from hf_l2.trainer import L2PenaltyMixin
from hf_l2.trainers import L2TrainerMixin

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


class L2TRLMixin(L2TrainerMixin):  # the one place hf_l2.integrations.trl names hf_l2's trainer mixin
    """hf_l2's penalty for a TRL trainer: `class L2XTrainer(L2TRLMixin, XTrainer)`, with `args` an `L2XConfig`
    (`hf_l2.integrations.trl.L2XConfig`, or one declared as
    `@dataclasses.dataclass class L2XConfig(XConfig, L2Config)`); without `args`, `L2XConfig` with TRL's defaults.

    On top of [`L2TrainerMixin`] it refuses, before the trainer is built, a config class whose base order silently
    replaced the TRL config's defaults by the stock Trainer's; and the model card (hf_l2's, which replaces TRL's)
    keeps TRL's tags and adds which TRL trainer ran and its citations. `create_model_card` and `push_to_hub` also
    take TRL's `dataset_name` (a Hub dataset id). The output anchor (`l2_kl_coef`) is refused except where a
    trainer says where its logits come from (`L2SFTTrainer`).
    """

    _l2_token_logits = None
    _l2_dft_by = None

    def __init__(self, *args, **kwargs):
        config = _bound_arguments(type(self), args, kwargs).get("args")
        if config is not None:
            check_config_class(type(config))
        super().__init__(*args, **kwargs)

    @classmethod
    def l2_config_class(cls) -> type[L2Config]:
        """The trainer's `default_config` if it names one, else `L2<X>Config` for the TRL trainer's `<X>Config`."""
        if cls.default_config is not L2Config:
            return cls.default_config
        return l2_config_for(trl_config_class(cls))

    def _l2_default_args(self, model) -> L2Config:
        """`args=None`, as TRL builds it: the config's defaults, with the output folder `<model name>-<trainer>`."""
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        return self.l2_config_class()(f"{(name or '').split('/')[-1]}-{getattr(self, '_name', type(self).__name__)}")

    def create_model_card(self, *args, dataset_name: str | list[str] | None = None, **kwargs) -> None:
        """hf_l2's card (see `L2PublishingMixin.create_model_card`); TRL's `dataset_name` counts as `dataset_tags`."""
        if dataset_name is not None and kwargs.get("dataset_tags") is None:
            kwargs["dataset_tags"] = dataset_name
        super().create_model_card(*args, **kwargs)

    def _write_model_card(self, output_dir: str, info: CardInfo) -> None:
        super()._write_model_card(output_dir, info)
        if self.is_world_process_zero():
            add_trl_section(os.path.join(output_dir, CARD_FILE), self)


def _trainer_init(trainer_cls: type):
    """The TRL trainer's `__init__`: the first after hf_l2's mixins that names an `args` parameter, past
    `*args, **kwargs` pass-throughs (TRL 1.0's `trl.KTOTrainer` wraps `trl.experimental.kto.KTOTrainer` so)."""
    inits = [c.__dict__["__init__"] for c in trainer_cls.__mro__
             if "__init__" in c.__dict__ and not issubclass(c, L2PenaltyMixin)]
    named = (init for init in inits if (parameter := inspect.signature(init).parameters.get("args")) is not None
             and parameter.kind is not parameter.VAR_POSITIONAL)
    return next(named, inits[0])


def _bound_arguments(trainer_cls: type, args: tuple, kwargs: dict) -> dict:
    """The arguments by name, as the TRL trainer's `__init__` will receive them."""
    try:
        return inspect.signature(_trainer_init(trainer_cls)).bind_partial(None, *args, **kwargs).arguments
    except TypeError:  # let the trainer itself report a wrong call
        return {}


def trl_config_class(trainer_cls: type) -> type[TrainingArguments]:
    """The config class of the TRL trainer under `trainer_cls`, from its `__init__`'s annotation of `args`
    (`SFTConfig | TrainingArguments | None` → `SFTConfig`)."""
    parameter = inspect.signature(_trainer_init(trainer_cls)).parameters.get("args")
    annotation = parameter.annotation if parameter is not None else None
    found = [
        t for t in typing.get_args(annotation) or (annotation,)
        if isinstance(t, type) and issubclass(t, TrainingArguments) and t is not TrainingArguments
    ]
    if len(found) != 1:
        raise TypeError(
            f"`{trainer_cls.__name__}` got no `args` and its trainer's `__init__` does not say which config it takes: "
            "pass `args=` an instance of `@dataclasses.dataclass class L2XConfig(XConfig, L2Config)`, XConfig being "
            f"the trainer's config class (or set `default_config = L2XConfig` on `{trainer_cls.__name__}`)."
        )
    return found[0]


def l2_config_for(trl_config: type[TrainingArguments]) -> type[L2Config]:
    """`@dataclasses.dataclass class L2<X>(<X>, L2Config)` for a TRL config class `<X>`: `L2SFTConfig` and
    `L2DPOConfig` as declared below; any other is made once and set on this module, where pickle looks for it
    (the Trainer pickles `args` into every checkpoint's `training_args.bin`)."""
    if trl_config not in _L2_CONFIGS:
        name = f"L2{trl_config.__name__}"
        doc = f"[`trl.{trl_config.__name__}`] (with its defaults) plus the `l2_*` fields of [`hf_l2.L2Config`]."
        made = dataclasses.make_dataclass(name, [], bases=(trl_config, L2Config),
                                          namespace={"__module__": __name__, "__doc__": doc})
        globals()[name] = _L2_CONFIGS[trl_config] = made
    return _L2_CONFIGS[trl_config]


def __getattr__(name: str):
    """`from hf_l2.integrations.trl import L2KTOConfig`, and unpickling a `training_args.bin` that holds one:
    `L2<X>Config` for any TRL config `<X>Config`, made by `l2_config_for`."""
    trl_config = getattr(trl, name[2:], None) if name.startswith("L2") and name.endswith("Config") else None
    if isinstance(trl_config, type) and issubclass(trl_config, TrainingArguments):
        return l2_config_for(trl_config)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        (f"The training loop was [TRL](https://github.com/huggingface/trl)'s {name} trainer (TRL {trl.__version__})"
        f"{method}, with hf_l2's penalty (see Regularization) added to its loss."),
        "",
    ]
    if paper.get("citation"):
        lines += [f"Cite {name} as:", "", "```bibtex", paper["citation"].strip(), "```", ""]
    lines += ["Cite TRL as:", "", "```bibtex", TRL_CITATION, "```", ""]
    card.text = card.text.rstrip() + "\n\n" + "\n".join(lines)
    card.save(card_path)


@dataclasses.dataclass
class L2SFTConfig(SFTConfig, L2Config):
    """[`trl.SFTConfig`] (with its defaults) plus the `l2_*` fields of [`hf_l2.L2Config`].

    `l2_token_weighting="dft"` and TRL's `loss_type="dft"` are one setting: either sets the other.
    """

    def __post_init__(self):
        if self.l2_token_weighting == "dft" or self.loss_type == "dft":
            if self.loss_type not in ("nll", "dft"):
                raise ValueError(
                    f"`l2_token_weighting='dft'` is TRL's `loss_type='dft'`; `loss_type='{self.loss_type}'` is "
                    "another loss: drop one of the two."
                )
            self.loss_type = self.l2_token_weighting = "dft"
        super().__post_init__()


class L2SFTTrainer(L2TRLMixin, SFTTrainer):
    """[`trl.SFTTrainer`] that fine-tunes with an explicit L2 or L2-SP penalty; takes an [`L2SFTConfig`].

    With `peft_config`, θ₀ is taken from the wrapped model (the LoRA factors as initialized); `l2_lora_delta=True`
    penalizes each adapted layer's weight change instead. `l2_kl_coef` projects the hidden states TRL's fused LM
    head sees.
    """

    default_config = L2SFTConfig
    _l2_token_logits = "backbone"  # TRL's SFT loss never builds the logits
    _l2_dft_by = "loss_type"  # TRL's own DFT (`SFTConfig.loss_type="dft"`)


@dataclasses.dataclass
class L2DPOConfig(DPOConfig, L2Config):
    """[`trl.DPOConfig`] (with its defaults) plus the `l2_*` fields of [`hf_l2.L2Config`]."""


class L2DPOTrainer(L2TRLMixin, DPOTrainer):
    """[`trl.DPOTrainer`] with the penalty on the policy (the reference model is never penalized nor trained);
    takes an [`L2DPOConfig`]."""

    default_config = L2DPOConfig


_L2_CONFIGS: dict[type, type[L2Config]] = {SFTConfig: L2SFTConfig, DPOConfig: L2DPOConfig}
