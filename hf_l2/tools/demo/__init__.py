"""The offline demo: what L2-SP and the other anchors do to a small pretrained model, for generation and for
translation.

`hf-l2 demo` (or `run_demo()`) prepares offline data, pretrains two tiny starting models and sweeps the recipes
over every method (`l2_mode`, the KL anchor, WiSE-FT) × strength × seeds; see `docs/demo.md`.
"""

from hf_l2.tools.demo.run import FULL, FineTuning, Sizes, add_demo_parser, run_demo

__all__ = ["run_demo", "add_demo_parser", "Sizes", "FineTuning", "FULL"]
