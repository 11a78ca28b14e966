"""The output-space anchor: λ·τ²·KL(p_θ₀ ‖ p_θ) per target token, with θ₀'s predictions from the same module.

The reference forward runs the trained model itself with θ₀ in place of its trainable parameters
(`torch.func.functional_call`, under `no_grad`, in eval mode), so no second model is kept: the memory cost is θ₀
of the trainable parameters (shared with the L2-SP anchors where they exist) plus one forward's activations.
Under FSDP2 each rank holds its shard of θ₀ and the forward runs through the sharded model with θ₀'s shards in
place of θ's (`hf_l2.sharded_reference`): θ₀ / world size per rank, plus one layer gathered at a time.
Frozen parameters and buffers never change, so the module's own ones are θ₀ already. For a PEFT model θ₀ includes
the adapters as they started (B₀ = 0 for PEFT's default LoRA init, so this is the base model; also exact for
PiSSA-style inits and adapters loaded to continue training, where disabling the adapters would not be θ₀).

Nothing here knows about the Trainer: which tokens count (`hf_l2.target_tokens`) and how the sum is normalized
are the caller's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hf_l2.sharded_reference import fsdp2_modules, swapped_in
from hf_l2.sharding import Piece, local_pieces, world_size
from hf_l2.target_tokens import target_logits


def token_kl_sum(
    policy: torch.Tensor, reference: torch.Tensor, temperature: float, chunk_rows: int | None = None
) -> torch.Tensor:
    """τ²·Σ_tokens KL(softmax(z₀/τ) ‖ softmax(z/τ)) over rows of (N, vocab) logits, in fp32 (Hinton et al. 2015:
    the τ² keeps the gradient's scale independent of τ). Gradient to ``policy`` only.

    Computed ``chunk_rows`` rows at a time (default: `CPU_CHUNK_BYTES` or `DEVICE_CHUNK_BYTES` of fp32 per chunk),
    so that its temporaries are a few chunk × vocab tensors whatever N. Each chunk's gradient is formed in the same
    pass, as liger-kernel's fused cross-entropy does: backward keeps only ∂/∂policy (the inputs can be freed after
    the forward) and recomputes nothing.
    """
    if chunk_rows is None:
        chunk_bytes = CPU_CHUNK_BYTES if policy.device.type == "cpu" else DEVICE_CHUNK_BYTES
        chunk_rows = max(1, chunk_bytes // (4 * max(policy.shape[-1], 1)))
    return _ChunkedTokenKL.apply(policy, reference.detach(), float(temperature), chunk_rows)


# Bytes of one fp32 chunk × vocab temporary. CPU: a chunk's few temporaries stay in the cache, which the passes
# over them then hit (on 2 EPYC cores fastest at 0.4–1 MiB: 2–5 rows of a 49k vocabulary); accelerators: large
# enough that the kernel launches per chunk are few.
CPU_CHUNK_BYTES = 2**20
DEVICE_CHUNK_BYTES = 256 * 2**20


class _ChunkedTokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy, reference, temperature, chunk_rows):
        grad = torch.empty_like(policy) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float64, device=policy.device)
        for rows in _chunks(len(policy), chunk_rows):
            log_p = F.log_softmax(_scaled(policy[rows], temperature), dim=-1)
            log_q = F.log_softmax(_scaled(reference[rows], temperature), dim=-1)
            q = log_q.exp()
            total += torch.linalg.vecdot(q, log_q.sub_(log_p)).sum()
            if grad is not None:  # ∂/∂z of τ²·KL(q ‖ softmax(z/τ)) = τ·(softmax(z/τ) − q), row by row
                p_minus_q = log_p.exp_().sub_(q)
                grad[rows] = p_minus_q if temperature == 1 else p_minus_q.mul_(temperature)
        ctx.save_for_backward(grad)
        return (total * temperature**2).float()

    @staticmethod
    def backward(ctx, grad_total):
        # Scaled in place: a second backward through the graph (retain_graph) is refused by autograd, since the
        # saved tensor changed, rather than scaled twice.
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total), None, None, None


def _chunks(n: int, size: int) -> Iterator[slice]:
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z/τ in fp32; at τ = 1 an fp32 chunk is used as it is (no copy)."""
    logits = logits.float()
    return logits if temperature == 1 else logits / temperature


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (θ₀'s predictions without dropout), each flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class OutputAnchor:
    """θ₀ of every trainable parameter of ``model`` and the reference forward that uses it.

    ``shared`` maps parameter names to getters of a tensor that already holds their θ₀ (the penalty's anchors):
    those are read at each forward, never copied, so a θ₀ the penalty restores on resume is used too. A shared
    tensor must have the parameter's shape, dtype and device (else its conversion would be a full copy per step);
    the other trainable parameters are snapshot here, as they are now (``own``). ``own_layout[name] = (start,
    shape)`` says where each snapshot begins in the full θ₀ flattened in row-major order, and the full shape: under
    FSDP2 the first reference forward cuts ``own`` down to this rank's shards (``sharded`` then says each rank
    holds other pieces, saved one file per rank).
    """

    def __init__(
        self, model: nn.Module, coef: float, temperature: float,
        shared: Mapping[str, Callable[[], torch.Tensor]] | None = None,
    ):
        self.coef, self.temperature = float(coef), float(temperature)
        parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied weights appear once
        shared = shared or {}
        self.shared = {n: get for n, get in shared.items() if n in parameters and _fits(get(), parameters[n])}
        with torch.no_grad():
            self.own = {n: p.detach().clone() for n, p in parameters.items() if n not in self.shared}
        self.own_layout = {n: (0, t.shape) for n, t in self.own.items()}
        self.sharded = False

    def anchors(self) -> dict[str, torch.Tensor]:
        return {**self.own, **{n: get() for n, get in self.shared.items()}}

    def restore(self, saved: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[int, torch.Size]]) -> None:
        """Replace the snapshot by the one a run saved (resume: whole tensors, or this rank's pieces at ``layout``);
        each tensor keeps the dtype and device it had. The next sharded forward cuts them to this rank's shards."""
        for name, old in self.own.items():
            self.own[name] = saved[name].to(dtype=old.dtype, device=old.device)
            self.own_layout[name] = layout.get(name, (0, saved[name].shape))

    @property
    def own_bytes(self) -> int:
        """Bytes of θ₀ held by this object alone (the shared part costs nothing extra)."""
        return sum(t.numel() * t.element_size() for t in self.own.values())

    @torch.no_grad()
    def reference_outputs(self, model: nn.Module, inputs: Mapping) -> object:
        """``model(**inputs)`` with θ₀ in place of the trainable parameters, in eval mode, without autograd.

        A decoder-only model gets no ``labels``: only its logits are used, and its loss would be one more
        log-softmax over the vocabulary (an encoder-decoder model builds its decoder inputs from them).
        Under FSDP2 it must run before the training forward of the same step (see `hf_l2.sharded_reference`).
        """
        if not getattr(model.config, "is_encoder_decoder", False):
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        modules = fsdp2_modules(model)
        if modules:
            with swapped_in(modules, lambda: self._local_pairs(model)), eval_mode(model):
                return model(**inputs)
        with eval_mode(model):
            return functional_call(model, self.anchors(), args=(), kwargs=dict(inputs), strict=False)

    def _local_pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(this rank's piece of θ, the same piece of θ₀) for each trainable parameter; ``own`` is cut to the pieces
        on first use. A meta θ₀ (taken before this rank had weights) is the parameter's value before any step."""
        pieces = local_pieces(model)
        self.sharded = self.sharded or (any(p.sharded for p in pieces.values()) and world_size() > 1)
        pairs = []
        for name, piece in pieces.items():
            if name in self.own:
                start, shape = self.own_layout[name]
                stored = self.own[name]
                if stored.is_meta:
                    stored, start = piece.local.detach().clone(), piece.start
                anchor = _cut(name, stored, start, piece)
                if anchor.numel() != stored.numel() or anchor.device != piece.param.device:
                    anchor = anchor.to(piece.param.device, copy=True)  # the piece alone: the rest is freed
                self.own[name], self.own_layout[name] = anchor, (piece.start, shape)
            elif name in self.shared and not (anchor := self.shared[name]()).is_meta:
                # The penalty's θ₀: whole until it binds to the shards at its first optimizer step, then its piece.
                start = 0 if anchor.numel() == math.prod(piece.shape) else piece.start
                anchor = _cut(name, anchor, start, piece)
            else:
                continue
            pairs.append((piece.local.detach(), anchor))
        return pairs


def _cut(name: str, stored: torch.Tensor, start: int, piece: Piece) -> torch.Tensor:
    """The values of ``piece``, viewed in ``stored``, which begins at ``start`` of the full flattened θ₀."""
    offset, size = piece.start - start, piece.numel
    if offset < 0 or offset + size > stored.numel():
        raise ValueError(
            f"`l2_kl_coef`: the stored θ₀ of {name!r} holds elements [{start}, {start + stored.numel()}) of the full "
            f"tensor, but this rank's shard needs [{piece.start}, {piece.start + size}). It was saved by a run "
            "sharded differently: resume with the same number of processes and the same FSDP settings."
        )
    return stored.reshape(-1)[offset : offset + size].view(piece.local.shape)


def _fits(anchor: torch.Tensor, param: torch.Tensor) -> bool:
    return anchor.shape == param.shape and anchor.dtype == param.dtype and anchor.device == param.device


class BackboneCapture:
    """The hidden states a fused LM head turns into per-token log-probabilities (TRL's SFT loss never builds the
    logits): a forward hook on the backbone keeps its last hidden state, and ``target_logits`` projects only the
    target positions through the output embeddings, with gradient.

    Only for heads that are a plain linear map: models with logit scaling or soft-capping are refused.
    """

    SCALING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")

    def __init__(self, model: nn.Module):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config.get_text_config()
        scaled = [k for k in self.SCALING if getattr(config, k, None) not in (None, 1, 1.0)]
        if scaled:
            raise ValueError(
                f"`l2_kl_coef` > 0 with a fused LM head: the model scales its logits ({scaled}), which the KL's "
                "projection of the hidden states does not reproduce. Set `l2_kl_coef=0` for this model."
            )
        self.base = base
        self.hidden: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        def keep(module, args, output):
            self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        handle = self.base.base_model.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def target_logits(self, labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor:
        head = self.base.get_output_embeddings()
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("`l2_kl_coef`: the training forward did not run the model's backbone.")
        rows = target_logits(hidden, labels, shift_labels, shifts=True)
        return F.linear(rows.to(head.weight.device), head.weight, head.bias)
