"""Training arguments with the L2 fields: `L2Config` (a `TrainingArguments`) and `L2Seq2SeqConfig`."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.utils import logging

from hf_l2.argument_checks import check_number, compile_patterns
from hf_l2.schedule import SCHEDULES, CoefSchedule
from hf_l2.token_weighting import TOKEN_WEIGHTINGS

logger = logging.get_logger(__name__)

MODES = ("l2_sp", "l2_sp_fisher", "l2", "none")
ANCHORED_MODES = ("l2_sp", "l2_sp_fisher")  # the modes that keep θ₀
IMPLS = ("grad", "loss", "decoupled")
ANCHOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ANCHOR_DEVICES = ("param", "cpu")


@dataclass
class L2Config(TrainingArguments):
    """[`~transformers.TrainingArguments`] plus an explicit L2 penalty Ω on top of the model loss.

    Parameters:
        l2_mode (`str`, defaults to `"l2_sp"`):
            `"l2_sp"`: Ω = (α/2)·Σ‖θ − θ₀‖² over anchored parameters + (β/2)·Σ‖θ‖² over new ones (Li, Grandvalet
            & Davoine, ICML 2018). `"l2_sp_fisher"`: the same with each anchored value's pull weighted by the diagonal
            empirical Fisher at θ₀, (α/2)·Σ F·(θ − θ₀)² (see `l2_fisher_*`). `"l2"`: Ω = (α/2)·Σ‖θ‖², coupled
            through the optimizer (not AdamW's decoupled `weight_decay`). `"none"`: exactly the stock Trainer.
        l2_coef (`float`, defaults to `0.01`):
            α ≥ 0.
        l2_head_coef (`float`, defaults to `0.0`):
            β ≥ 0, for new parameters (no pretrained counterpart) in `l2_sp` mode.
        l2_head_params (`list[str]`, *optional*):
            Regexes (`re.search` on parameter names) of parameters to treat as new, e.g. a fresh head.
        l2_exclude (`list[str]`, *optional*):
            Regexes of parameter names left out of the penalty.
        l2_exclude_bias_and_norm (`bool`, defaults to `True`):
            Leave biases and normalization weights out, by the Trainer's own weight-decay rule.
        l2_impl (`str`, defaults to `"grad"`):
            `"grad"`: add ∇Ω to the gradients once per optimizer step, after the last backward and before clipping.
            `"loss"`: add Ω to the loss through autograd (required under DeepSpeed). Both give the same parameters.
            `"decoupled"`: no gradient; each optimizer step first moves θ ← θ − lr·α·(θ − θ₀) (new parameters:
            θ ← θ − lr·β·θ) with the learning rate of the parameter's group, as AdamW applies weight decay;
            lr·α ≥ 1 (and lr·β ≥ 1) is refused, as the pull would overshoot θ₀.
        l2_anchor_path (`str`, *optional*):
            Folder or Hub id whose weights are θ₀; parameters absent there are new. Defaults to the weights the
            model has when the trainer is built.
        l2_anchor_dtype (`str`, defaults to `"float32"`):
            Storage dtype of θ₀: `float32`, `bfloat16` or `float16` (the penalty is always computed in fp32).
        l2_anchor_device (`str`, defaults to `"param"`):
            `"param"`: θ₀ lives beside each parameter; `"cpu"`: in host memory, copied over at each step.
        l2_lora_delta (`bool`, defaults to `False`):
            On a PEFT LoRA model in `l2_sp` mode, penalize the change of each adapted layer's effective weight,
            (α/2)·‖s·B·A − s·B₀·A₀‖²_F (B₀ = 0 after PEFT's default init), instead of A and B separately.
        l2_fisher_samples (`int`, defaults to `1024`):
            `l2_sp_fisher`: how many examples of the Fisher data (the trainer's `fisher_dataset`, default the training
            set; fewer if it is smaller) F is averaged over, each with its own forward and backward, before training.
        l2_fisher_normalize (`bool`, defaults to `True`):
            `l2_sp_fisher`: divide F by its mean over the penalized values, so that α means about what it means for
            `l2_sp`; the raw F otherwise.
        l2_fisher_path (`str`, *optional*):
            `l2_sp_fisher`: a `l2_fisher.safetensors` file, or a folder holding one (a run's output or checkpoint),
            to load F from instead of computing it (`l2_fisher_normalize` is applied to it). It is checked as
            θ₀ files are (checksums, shapes, dtype, finite values) and may hold no negative value.
        l2_coef_schedule (`str`, defaults to `"constant"`):
            Multiply α and β by f(t) over the optimizer steps: `constant` (1), `linear` or `cosine` (1 down to
            `l2_coef_end_factor`), `sigmoid` (RecAdam's annealing 1 − 1/(1 + exp(−k(t − t₀)))).
        l2_coef_end_factor (`float`, defaults to `0.0`):
            Where `linear` and `cosine` end, and `sigmoid`'s floor, as a fraction of α and β (> 1 grows them).
        l2_sigmoid_k (`float`, defaults to `0.1`):
            Slope k > 0 of the `sigmoid` schedule, per optimizer step.
        l2_sigmoid_t0 (`float`, *optional*):
            Optimizer step t₀ ≥ 0 at which the `sigmoid` schedule is halfway; defaults to half the total steps.
        l2_kl_coef (`float`, defaults to `0.0`):
            λ ≥ 0 of an output-space anchor, with any `l2_mode`: the training loss gains λ·τ²·KL(p_θ₀ ‖ p_θ) per
            target token (labels ≠ −100), averaged like the task loss. θ₀'s predictions come from the same model
            run with θ₀ (no second model): one extra forward per micro-batch, without backward.
        l2_kl_temperature (`float`, defaults to `1.0`):
            τ > 0: both distributions are softmax(logits/τ), and the KL is multiplied by τ² (as in distillation).
        l2_token_weighting (`str`, defaults to `"none"`):
            `"dft"`: the task loss is Dynamic Fine-Tuning's (Wu et al. 2025): each target token's cross-entropy
            times its probability under the current model, detached, normalized as the task loss is. With
            `l2_kl_coef` > 0 this is Anchored SFT (ASFT, Zhu et al., ICLR 2026). The logged `loss` is then the DFT
            loss and `l2/ce` the plain cross-entropy of the same tokens; the eval loss stays the model's own.
            TRL's `L2SFTTrainer` runs TRL's `loss_type="dft"` for it. `"none"`: the task loss as it is.
    """

    l2_mode: str = field(
        default="l2_sp", metadata={"help": "Penalty: l2_sp, l2_sp_fisher, l2 or none.", "choices": list(MODES)}
    )
    l2_coef: float = field(default=0.01, metadata={"help": "α ≥ 0: strength of the pull (toward θ₀ for l2_sp)."})
    l2_head_coef: float = field(
        default=0.0, metadata={"help": "β ≥ 0: plain L2 on new parameters (no pretrained counterpart), l2_sp only."}
    )
    l2_head_params: list[str] | None = field(
        default=None, metadata={"help": "Regexes of parameter names to treat as new (e.g. a fresh head)."}
    )
    l2_exclude: list[str] | None = field(
        default=None, metadata={"help": "Regexes of parameter names left out of the penalty."}
    )
    l2_exclude_bias_and_norm: bool = field(
        default=True, metadata={"help": "Leave biases and norm weights out (the Trainer's weight-decay rule)."}
    )
    l2_impl: str = field(
        default="grad",
        metadata={
            "help": "grad: add the penalty's gradient once per optimizer step before clipping; "
            "loss: add the penalty to the loss (needed under DeepSpeed); "
            "decoupled: pull the weights by lr·α·(θ − θ₀) at each optimizer step, outside the gradient.",
            "choices": list(IMPLS),
        },
    )
    l2_anchor_path: str | None = field(
        default=None, metadata={"help": "Folder or Hub id whose weights are θ₀ (default: the model's own at start)."}
    )
    l2_anchor_dtype: str = field(
        default="float32", metadata={"help": "dtype θ₀ is stored in.", "choices": list(ANCHOR_DTYPES)}
    )
    l2_anchor_device: str = field(
        default="param",
        metadata={"help": "param: θ₀ beside each parameter; cpu: in host memory.", "choices": list(ANCHOR_DEVICES)},
    )
    l2_lora_delta: bool = field(
        default=False,
        metadata={"help": "LoRA models, l2_sp: penalize ‖s·B·A − s·B₀·A₀‖² per adapted layer instead of A and B."},
    )
    l2_fisher_samples: int = field(
        default=1024, metadata={"help": "l2_sp_fisher: examples the Fisher is averaged over (fewer if the set is)."}
    )
    l2_fisher_normalize: bool = field(
        default=True, metadata={"help": "l2_sp_fisher: divide F by its mean, so that α means what it does for l2_sp."}
    )
    l2_fisher_path: str | None = field(
        default=None, metadata={"help": "l2_sp_fisher: l2_fisher.safetensors (or its folder) to load F from."}
    )
    l2_coef_schedule: str = field(
        default="constant",
        metadata={"help": "Factor on α and β over the steps.", "choices": list(SCHEDULES)},
    )
    l2_coef_end_factor: float = field(
        default=0.0, metadata={"help": "Final factor of the linear/cosine schedules, floor of the sigmoid one."}
    )
    l2_sigmoid_k: float = field(default=0.1, metadata={"help": "Slope k > 0 of the sigmoid schedule, per step."})
    l2_sigmoid_t0: float | None = field(
        default=None, metadata={"help": "Step where the sigmoid schedule is halfway (default: half the total steps)."}
    )

    l2_kl_coef: float = field(
        default=0.0, metadata={"help": "λ ≥ 0: weight of the KL to θ₀'s predictions (output-space anchor)."}
    )
    l2_kl_temperature: float = field(default=1.0, metadata={"help": "τ > 0 of the KL term (with the τ² factor)."})
    l2_token_weighting: str = field(
        default="none",
        metadata={"help": "dft: weight each target token's cross-entropy by its detached probability (DFT; with "
                  "l2_kl_coef > 0, ASFT); none: the task loss as it is.", "choices": list(TOKEN_WEIGHTINGS)},
    )

    def __post_init__(self):
        self._use_cpu_for_cpu_processes()
        super().__post_init__()
        validate_l2_fields(self)

    def _use_cpu_for_cpu_processes(self) -> None:
        """Several processes (torchrun, `accelerate launch`) on a machine without an accelerator are CPU DDP.

        Without `use_cpu`, accelerate finds no device backend, sets `DistributedType.NO`, and every rank trains
        the whole run alone into the same `output_dir` (the Trainer only warns "parallel_mode !=
        ParallelMode.DISTRIBUTED"). With it, the processes form one gloo group."""
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if self.use_cpu or processes < 2 or torch.accelerator.is_available():
            return
        self.use_cpu = True
        logger.info(f"{processes} processes and no accelerator: `use_cpu=True`, so they train as one CPU DDP job.")

    @classmethod
    def from_training_args(cls, args: TrainingArguments, **l2_fields) -> L2Config:
        """This class built from `args` (every field kept, `hub_token` included) plus `l2_fields`, e.g.
        `L2Config.from_training_args(args, l2_coef=0.01)`. `L2Config.from_training_args` of a
        `Seq2SeqTrainingArguments` gives an `L2Seq2SeqConfig`; for a TRL config call it on the matching L2 class
        (`hf_l2.integrations.trl.L2SFTConfig.from_training_args(sft_config, ...)`, `L2<X>Config` for any TRL
        `<X>Config`).

        Not `L2Config(**args.to_dict(), ...)`: `to_dict()` replaces the tokens by placeholders such as
        `"<HUB_TOKEN>"`, which the new config would then push with.
        """
        target = L2Seq2SeqConfig if cls is L2Config and isinstance(args, Seq2SeqTrainingArguments) else cls
        known = {f.name for f in fields(target) if f.init}
        foreign = [f.name for f in fields(args) if f.init and f.name not in known]
        if foreign:
            name = type(args).__name__
            extended = (f"`from hf_l2.integrations.trl import L2{name}`" if type(args).__module__.startswith("trl.")
                        else f"`@dataclasses.dataclass class L2{name}({name}, L2Config)`")
            raise TypeError(
                f"`{name}` has fields `{target.__name__}` lacks, e.g. {foreign[:3]}: call `from_training_args` on an "
                f"L2 config that extends it, {extended}."
            )
        # Deep copies: `__post_init__` may edit dicts (e.g. `fsdp_config`) that `args` would otherwise share.
        values = {f.name: copy.deepcopy(getattr(args, f.name)) for f in fields(args) if f.init}
        return target(**{**values, **l2_fields})

    @property
    def l2_enabled(self) -> bool:
        return self.l2_mode != "none"

    @property
    def l2_schedule(self) -> CoefSchedule:
        return CoefSchedule(self.l2_coef_schedule, self.l2_coef_end_factor, self.l2_sigmoid_k, self.l2_sigmoid_t0)


@dataclass
class L2Seq2SeqConfig(L2Config, Seq2SeqTrainingArguments):
    """[`~transformers.Seq2SeqTrainingArguments`] with the fields of [`L2Config`]."""


def _one_of(config, name: str, allowed) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"`{name}`={value!r} is not one of {list(allowed)}.")


def validate_l2_fields(config: L2Config) -> None:
    """Reject bad values early, naming the field; warn about settings that are legal but likely unintended."""
    _one_of(config, "l2_mode", MODES)
    _one_of(config, "l2_impl", IMPLS)
    _one_of(config, "l2_anchor_dtype", ANCHOR_DTYPES)
    _one_of(config, "l2_anchor_device", ANCHOR_DEVICES)
    _one_of(config, "l2_token_weighting", TOKEN_WEIGHTINGS)
    for name in ("l2_coef", "l2_head_coef", "l2_kl_coef"):
        check_number(name, getattr(config, name))
    check_number("l2_kl_temperature", config.l2_kl_temperature, strict=True)
    for name in ("l2_head_params", "l2_exclude"):
        if isinstance(getattr(config, name), str):
            setattr(config, name, [getattr(config, name)])
        compile_patterns(getattr(config, name), name)
    _ = config.l2_schedule  # building it validates the schedule fields, naming the bad one
    _validate_fisher_fields(config)
    if config.l2_lora_delta and config.l2_mode not in ("l2_sp",):
        raise ValueError(
            "`l2_lora_delta=True` penalizes the change of each LoRA layer's weight from θ₀, an L2-SP penalty: "
            "set `l2_mode='l2_sp'` (the Fisher-weighted mode does not cover it)."
        )
    if config.l2_mode == "l2" and config.weight_decay > 0:
        logger.warning(
            f"`l2_mode='l2'` with `weight_decay={config.weight_decay}` decays the weights twice (the penalty and "
            "the optimizer's decoupled decay); set `weight_decay=0` unless you mean both."
        )
    if config.l2_mode == "l2" and (config.l2_head_params or config.l2_head_coef or config.l2_anchor_path):
        logger.warning(
            "`l2_head_params`, `l2_head_coef` and `l2_anchor_path` only apply to the L2-SP modes; "
            "in `l2` mode every regularized parameter gets `l2_coef`."
        )


def _validate_fisher_fields(config: L2Config) -> None:
    samples = config.l2_fisher_samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"`l2_fisher_samples` must be an integer ≥ 1, got {samples!r}.")
    path = config.l2_fisher_path
    if config.l2_mode != "l2_sp_fisher":
        if path:
            logger.warning("`l2_fisher_path` only applies to `l2_mode='l2_sp_fisher'`; it is ignored.")
        return
    if path and not os.path.exists(path):
        raise ValueError(
            f"`l2_fisher_path`: {path!r} does not exist; pass an l2_fisher.safetensors file or the run folder that "
            "holds one, or leave it unset to compute F from the Fisher data."
        )
