"""Examples that run offline in a minute, installed as `hf_l2.examples`: `python -m hf_l2.examples.quickstart` (L2-SP
on a tiny GPT-2) and `python -m hf_l2.examples.trl_sft` (chat SFT through TRL; needs `hf_l2[trl]`).
In a checkout, `python examples/quickstart.py` works too."""
