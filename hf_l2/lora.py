"""PEFT specifics: an L2-SP penalty on the change of each LoRA layer's effective weight, and the anchors of
`modules_to_save` copies.

A LoRA layer computes with W + ΔW, ΔW = Σ_a s_a·B_a·A_a over its active adapters a (B: out×r, A: r×in,
s = lora_alpha/r). With (A₀, B₀) the adapters when the penalty is built (B₀ = 0 or A₀ = 0 for PEFT's default
init, so ΔW₀ = 0):

    Ω = (α/2)·Σ_layers ‖ΔW − ΔW₀‖²_F

never forming an out×in matrix: for thin factors D = B̂·Â (B̂: out×R, Â: R×in), ‖D‖²_F = tr((B̂ᵀB̂)(ÂÂᵀ)), two
R×R Gram matrices. When ΔW₀ = 0, B̂ = [s_a·B_a]_a and Â = [A_a]_a, i.e. s²·tr((BᵀB)(AAᵀ)) for one adapter.
Otherwise (PiSSA/OLoRA-style inits, a loaded adapter) D = Σ_a s_a·(B_a·(A_a − A₀_a) + (B_a − B₀_a)·A₀_a): both
factors of each term shrink with the drift, so small changes are not computed as a difference of large terms.

For any such factorization the gradient is ∇_{B_a}Ω = α·s_a·B̂·(Â·A_aᵀ) and ∇_{A_a}Ω = α·s_a·(B_aᵀ·B̂)·Â.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hf_l2.argument_checks import matches


@dataclass
class LoraLayerSpec:
    """One adapted layer: its PEFT module, the adapters penalized there, and their A/B parameter names."""

    module_name: str
    module: nn.Module
    adapters: list[str]
    a_names: list[str]
    b_names: list[str]


def _unsupported(module_name: str, why: str) -> ValueError:
    return ValueError(
        f"`l2_lora_delta=True` does not support {module_name}: {why}. It covers LoRA on linear (incl. GPT-2's "
        "Conv1D) and embedding layers; set `l2_lora_delta=False` for plain L2-SP on the adapter weights."
    )


def find_lora_layers(model: nn.Module, exclude: Sequence[re.Pattern] = ()) -> list[LoraLayerSpec]:
    """The LoRA layers with trainable adapters, with a clear error for any whose ΔW is not s·B·A.

    An adapter is left out when an `l2_exclude` pattern matches its A or its B name.
    """
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from peft.tuners.lora.tp_layer import LoraParallelLinear

    specs = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters, a_names, b_names = [], [], []
        for adapter in [*module.lora_A, *module.lora_embedding_A]:
            linear = adapter in module.lora_A
            if linear:
                a, b = module.lora_A[adapter], module.lora_B[adapter]
                linear = isinstance(a, nn.Linear) and isinstance(b, nn.Linear)  # not conv
                params = (a.weight, b.weight)
                names = (f"{module_name}.lora_A.{adapter}.weight", f"{module_name}.lora_B.{adapter}.weight")
            else:
                params = (module.lora_embedding_A[adapter], module.lora_embedding_B[adapter])
                names = (f"{module_name}.lora_embedding_A.{adapter}", f"{module_name}.lora_embedding_B.{adapter}")
            if not any(p.requires_grad for p in params) or any(matches(n, exclude) for n in names):
                continue
            if adapter not in module.active_adapters:
                raise ValueError(
                    f"`l2_lora_delta`: adapter {adapter!r} of {module_name} is trainable but not active, so it is not "
                    "part of the layer's weight. Activate it (`set_adapter`) or freeze it."
                )
            embedding = adapter in module.lora_embedding_A
            if not (linear or embedding) or isinstance(module, (ParamWrapper, LoraParallelLinear)):
                raise _unsupported(module_name, f"it is a LoRA {type(module).__name__}")
            if adapter in module.lora_variant:
                variant = type(module.lora_variant[adapter]).__name__
                raise _unsupported(module_name, f"adapter {adapter!r} is a {variant}")
            if module.lora_bias.get(adapter):
                raise _unsupported(module_name, f"adapter {adapter!r} has `lora_bias=True`")
            if module.merged:
                raise ValueError(f"`l2_lora_delta`: {module_name} has merged adapters; call `unmerge_adapter()` first.")
            adapters.append(adapter)
            a_names.append(names[0])
            b_names.append(names[1])
        if adapters:
            specs.append(LoraLayerSpec(module_name, module, adapters, a_names, b_names))
    return specs


@dataclass
class _BoundLayer:
    spec: LoraLayerSpec
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    a0: list[torch.Tensor] | None  # None when ΔW₀ = 0
    b0: list[torch.Tensor] | None


class LoraDeltaPenalty:
    """Ω = (α/2)·Σ‖ΔW − ΔW₀‖²_F over LoRA layers, a :class:`~hf_l2.penalty_term.PenaltyTerm`."""

    def __init__(self, coef: float, layers: Sequence[LoraLayerSpec], anchors: dict[str, torch.Tensor]):
        self.base_coef = self.coef = float(coef)
        self.layers = list(layers)
        self.anchored_names = [n for s in self.layers for n in (*s.a_names, *s.b_names)]
        self.anchors = anchors
        missing = [n for n in self.anchored_names if n not in anchors]
        if missing:
            raise ValueError(f"No anchor for LoRA parameters: {missing[:5]}")
        self._bound = False

    def set_factor(self, factor: float) -> None:
        self.coef = self.base_coef * factor

    @property
    def penalized_names(self) -> list[str]:
        """Every parameter the term covers: the A and B factors."""
        return self.anchored_names

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this term: A₀ and B₀ (always whole)."""
        return {"anchors": self.anchors}

    def load_state_dict(self, state: Mapping) -> None:
        """A₀ and B₀ as saved by a run, each in the dtype and on the device it had here; bound again on next use."""
        for name in self.anchored_names:
            old = self.anchors[name]
            self.anchors[name] = state["anchors"][name].to(dtype=old.dtype, device=old.device)
        self._bound = False

    # ---- binding --------------------------------------------------------------------------------------------
    def bind(self, named_parameters: dict[str, torch.Tensor]) -> None:
        """Resolve names to live parameters; find the layers whose anchor has ΔW₀ ≠ 0 (one check per layer)."""
        # Only trainable factors get a gradient or a decoupled step (e.g. LoRA-FA freezes A).
        self.parameters = {n: named_parameters[n] for n in self.anchored_names if named_parameters[n].requires_grad}
        for name in self.anchored_names:  # small (r × (in + out) per layer): always kept beside the parameter
            self.anchors[name] = self.anchors[name].to(named_parameters[name].device)
        self._layers = []
        for spec in self.layers:
            a0 = [self.anchors[n] for n in spec.a_names]
            b0 = [self.anchors[n] for n in spec.b_names]
            moved = any(bool(x.any()) and bool(y.any()) for x, y in zip(a0, b0))
            self._layers.append(
                _BoundLayer(
                    spec,
                    [named_parameters[n] for n in spec.a_names],
                    [named_parameters[n] for n in spec.b_names],
                    a0 if moved else None,
                    b0 if moved else None,
                )
            )
        self._bound = True

    def bind_model(self, model: nn.Module) -> None:
        self.bind(dict(model.named_parameters()))

    @property
    def bound(self) -> bool:
        return self._bound

    def unbind(self) -> None:
        self._bound = False

    # ---- the factors D = B̂·Â -------------------------------------------------------------------------------
    @staticmethod
    def _factors(layer: _BoundLayer) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """B̂ (out×R), Â (R×in) in fp32 with B̂·Â = ΔW − ΔW₀, and the scalings s_a (read live: `set_scale`)."""
        scalings = [layer.spec.module.scaling[a] for a in layer.spec.adapters]
        a = [t.float() for t in layer.a]
        b = [s * t.float() for s, t in zip(scalings, layer.b)]
        if layer.a0 is None:
            return torch.cat(b, dim=1), torch.cat(a, dim=0), scalings
        a0 = [t.float() for t in layer.a0]
        b_drift = [s * (t.float() - t0.float()) for s, t, t0 in zip(scalings, layer.b, layer.b0)]
        return torch.cat(b + b_drift, dim=1), torch.cat([x - x0 for x, x0 in zip(a, a0)] + a0, dim=0), scalings

    def _delta_sq(self) -> torch.Tensor:
        """Σ_layers ‖ΔW − ΔW₀‖²_F = Σ tr((B̂ᵀB̂)(ÂÂᵀ)); differentiable when grad mode is on."""
        total = torch.zeros((), dtype=torch.float32, device=self._device())
        for layer in self._layers:
            b_hat, a_hat, _ = self._factors(layer)
            total = total + ((b_hat.T @ b_hat) * (a_hat @ a_hat.T)).sum().to(total.device)  # both Grams symmetric
        return total

    def _device(self) -> torch.device:
        return self._layers[0].a[0].device if self._layers else torch.device("cpu")

    # ---- value, loss term, gradient, decoupled step ---------------------------------------------------------
    def _omega(self, delta_sq: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.coef * delta_sq

    def value(self) -> torch.Tensor:
        with torch.no_grad():
            return self._omega(self._delta_sq())

    def delta_sq(self) -> torch.Tensor:
        """Σ‖ΔW − ΔW₀‖²_F, detached (logged as `l2/lora_delta`, its root)."""
        with torch.no_grad():
            return self._delta_sq()

    def log_values(self) -> dict[str, torch.Tensor]:
        """Ω and ‖ΔW − ΔW₀‖ (``lora_delta``) for a training log, as 0-d tensors."""
        delta_sq = self.delta_sq()
        return {"penalty": self._omega(delta_sq), "lora_delta": delta_sq.sqrt()}

    def loss_term(self) -> torch.Tensor:
        """Ω through autograd: a few r×r matrix products per layer, so no custom backward is needed."""
        return self._omega(self._delta_sq())

    @torch.no_grad()
    def gradients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, ∇Ω in fp32) for every trainable A and B, all from the current values."""
        out = []
        for layer in self._layers:
            b_hat, a_hat, scalings = self._factors(layer)
            for s, a, b in zip(scalings, layer.a, layer.b):
                if b.requires_grad:
                    out.append((b, self.coef * s * (b_hat @ (a_hat @ a.float().T))))
                if a.requires_grad:
                    out.append((a, self.coef * s * ((b.float().T @ b_hat) @ a_hat)))
        return out

    @torch.no_grad()
    def add_to_grads_(self, scale: torch.Tensor | None = None) -> None:
        """grad += ∇Ω (times the AMP loss scale, when given); with α = 0, no gradient is created."""
        if not self.coef:
            return
        for param, grad in self.gradients():
            if scale is not None:
                grad = grad * scale
            if param.grad is None:
                param.grad = grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))

    @torch.no_grad()
    def pull_(self, lr_of: Callable[[torch.Tensor], float]) -> None:
        """θ ← θ − lr·∇Ω for every trainable A and B, the gradients all taken before any update."""
        for param, grad in self.gradients():
            param.sub_(grad.to(param.dtype), alpha=lr_of(param))


def adapter_parameter_names(model: nn.Module) -> frozenset[str]:
    """Names of the PEFT adapter weights (LoRA's A and B, DoRA's magnitude, ...): those of every tuner layer's
    `adapter_layer_names` modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                names.update(f"{module_name}.{attr}.{n}" for n, _ in getattr(module, attr).named_parameters())
    return frozenset(names)


def modules_to_save_originals(model: nn.Module) -> dict[str, torch.Tensor]:
    """For each parameter of a PEFT `modules_to_save` copy, the frozen original module's tensor it was copied from.

    Under L2-SP these copies are pulled toward the pretrained module, which PEFT keeps frozen beside them, even
    when the model was loaded with an already trained copy.
    """
    from peft.utils.other import ModulesToSaveWrapper

    originals = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper) or module.original_module is None:
            continue
        original = dict(module.original_module.named_parameters())
        for adapter, copy in module.modules_to_save.items():
            for name, _ in copy.named_parameters():
                if name in original:
                    originals[f"{module_name}.modules_to_save.{adapter}.{name}"] = original[name]
    return originals
