"""The `hf-l2` command. Subcommands: `push` (publish a finished run to the Hub without retraining), `sweep` (a
recipe over an l2_mode × α × seed grid, with a table and plot), `interpolate` (WiSE-FT between a run's θ₀ and
its weights), `demo` (the offline L2-SP demo), `real-model` (the study on SmolLM2-135M-Instruct) and `smollm2`
(that model, materialized offline).

Each subcommand registers its parser in `build_parser` and sets `run`, a function of the parsed arguments that
returns the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml
from huggingface_hub import ModelCard

from hf_l2.publishing.card import CARD_FILE
from hf_l2.publishing.hub import HubPublishError, upload_run
from hf_l2.tools.demo import add_demo_parser
from hf_l2.tools.demo.real_model import add_real_model_parser
from hf_l2.tools.demo.smollm2 import add_smollm2_parser
from hf_l2.tools.interpolate import add_interpolate_parser
from hf_l2.tools.saved_folders import saved_model_problems
from hf_l2.tools.suggestions import unknown_arguments_message
from hf_l2.tools.sweep import add_sweep_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-l2", description="Tools for runs fine-tuned with hf_l2.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    push = commands.add_parser(
        "push",
        help="publish a saved run (model, tokenizer, card, plot) to the Hugging Face Hub",
        description="Upload OUTPUT_DIR, as written by trainer.save_model(), to a Hub model repo (created if needed). "
        "Checkpoint folders, θ₀ files and training_args.bin (it holds any --hub_token) are left out.",
    )
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output folder")
    push.add_argument("--repo-id", required=True, help="'name' (in your namespace) or 'user-or-org/name'")
    push.add_argument("--private", action="store_true", help="make the repo private when creating it")
    push.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN, `hf auth login`)")
    push.add_argument("--revision", default=None, help="branch to push to (default: main)")
    push.add_argument("--commit-message", default="Upload fine-tuned model with hf_l2")
    push.set_defaults(run=_push)
    add_sweep_parser(commands)
    add_interpolate_parser(commands)
    add_demo_parser(commands)
    add_real_model_parser(commands)
    add_smollm2_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # What follows `--` is a recipe's own command line (sweep, interpolate --eval), split off before argparse,
    # which would otherwise let a positional argument swallow the options after it.
    argv = sys.argv[1:] if argv is None else list(argv)
    head, tail = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, None)
    parser = build_parser()
    refuse_unknown_flags(parser, head)
    args = parser.parse_args(head)
    if tail is not None:
        if not hasattr(args, "recipe_args"):
            parser.error(f"`hf-l2 {args.command}` takes no recipe arguments after `--`.")
        args.recipe_args = tail
    return args.run(args)


def refuse_unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Exit with the nearest valid flag for a misspelled one (before argparse, which would only say that a
    misspelled required flag is missing)."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    name = next((item for item in argv if item in commands.choices), None)
    command = commands.choices[name] if name else parser
    known = [option for action in command._actions for option in action.option_strings]
    unknown = [item for item in argv if item.startswith("-") and not _is_number(item)
               and not any(option.startswith(item.split("=", 1)[0]) for option in known)]  # argparse's abbreviations
    if unknown:
        command.error(unknown_arguments_message(unknown, known))


def _is_number(text: str) -> bool:  # `--weight -0.5`: a value, not a flag
    try:
        float(text)
    except ValueError:
        return False
    return True


def _push(args: argparse.Namespace) -> int:
    folder = args.output_dir
    errors, warnings = saved_model_problems(folder)
    if errors:
        print(f"hf-l2 push: {folder} is not a finished model to publish: {'; '.join(errors)}. Pass the folder that "
              "trainer.save_model() wrote.", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"hf-l2 push: warning: {warning}.", file=sys.stderr)
    card = os.path.join(folder, CARD_FILE)
    if not os.path.isfile(card):
        print(f"hf-l2 push: warning: no {CARD_FILE} in {folder}; the repo will have no model card.", file=sys.stderr)
    else:
        try:
            ModelCard.load(card)  # the Hub checks the YAML header too, but only after the token and repo
        except (ValueError, yaml.YAMLError) as err:
            print(f"hf-l2 push: the metadata of {card} is invalid ({err}); correct its YAML header.", file=sys.stderr)
            return 2
    try:
        commit = upload_run(
            folder,
            args.repo_id,
            token=args.token,
            private=args.private or None,
            commit_message=args.commit_message,
            revision=args.revision,
        )
    except HubPublishError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"Pushed {folder} to {commit.repo_url}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
