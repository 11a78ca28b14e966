"""The penalty inside other libraries' trainers: `hf_l2.integrations.trl` (SFT, DPO, Reward, KTO, ...)."""
