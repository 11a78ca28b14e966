"""The tools around the penalty library: the `hf-l2` CLI, the sweep and its report, the recipes' shared plumbing,
saved-folder checks, WiSE-FT interpolation, the offline demo and the real-model study, metrics, local tokenizers."""

# What the tools need beyond the core's dependencies: the `recipes` extra installs them.
_TOOL_DEPENDENCIES = ("datasets", "evaluate", "sentencepiece", "sacremoses", "sacrebleu", "tensorboard", "matplotlib")


def main(argv: list[str] | None = None) -> int:
    """The `hf-l2` command (`hf_l2.tools.cli`), or one line saying which extra to install when a tool's dependency
    is missing: the core (`L2Trainer`) installs without them."""
    try:
        from hf_l2.tools.cli import main as cli_main
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in _TOOL_DEPENDENCIES:
            raise
        raise SystemExit(f"hf-l2 needs `{err.name}`, which the core of hf_l2 does not install: "
                         "pip install \"hf_l2[recipes]\"") from err
    return cli_main(argv)
