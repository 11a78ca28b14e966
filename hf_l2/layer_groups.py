"""How reports name groups of layers: the rule behind `weights/norm/<group>` and the model card's drift table."""

from __future__ import annotations

import re

# First matching rule names the group; order matters ("attn.c_proj" is attention, "mlp.c_proj" is MLP).
_TYPE_RULES = [
    ("layer_norm", re.compile(r"(^|[._])(ln|norm|layernorm|layer_norm|rmsnorm)[._\d]|norm(\.|$)", re.I)),
    ("embeddings", re.compile(r"embed|(^|\.)(wte|wpe|shared)(\.|$)", re.I)),
    ("head", re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|final_logits_bias)(\.|$)", re.I)),
    ("attention", re.compile(r"attn|attention|(^|\.)(q|k|v|o|out|qkv)_proj(\.|$)", re.I)),
    ("mlp", re.compile(r"mlp|(^|\.)(fc\d?|c_fc|ffn|feed_forward|up_proj|down_proj|gate_proj|wi|wo)(\.|$)", re.I)),
]
_LAYER = re.compile(r"\.(\d+)\.")
GROUPINGS = ("type", "layer")


def parameter_group(name: str, group_by: str) -> str:
    """Group of a parameter name: by kind of layer (`"type"`) or by block index (`"layer"`, else by kind)."""
    if group_by == "layer":
        hit = _LAYER.search(name)
        if hit:
            return f"layer_{int(hit.group(1)):02d}"
    return next((group for group, rule in _TYPE_RULES if rule.search(name)), "other")
