"""The shipped recipes, installed as `hf_l2.recipes`: run one as `python -m hf_l2.recipes.gpt2_generation ...` (or,
from a checkout, `python recipes/gpt2_generation.py ...`), or through `hf-l2 sweep --recipe gpt2_generation`.

Their example configurations are package data here too: `configs/*.yaml` (every argument of a recipe) and
`accelerate_configs/*.yaml` (launchers), at `importlib.resources.files("hf_l2.recipes")`.
"""
