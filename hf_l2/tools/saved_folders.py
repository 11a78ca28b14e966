"""What a saved folder must hold before it is used: a checkpoint before resuming from it, a model before pushing it.

A kill during a save leaves a checkpoint folder with some files missing or cut short (the Trainer writes
`trainer_state.json` last); each check here returns what is missing in words, so the caller can skip the folder or
refuse it in one line. Files are only opened far enough to prove they are whole (a safetensors header covers the
whole file; a torch zip file ends with its directory), never loaded.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import zipfile

from safetensors import SafetensorError, safe_open

from hf_l2.saved_state import ANCHOR_FILES, FISHER_FILES, KL_ANCHOR_FILES, rank_files_glob

# transformers.trainer_utils.PREFIX_CHECKPOINT_DIR, as `get_last_checkpoint` matches it.
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# One weights file (or index) that `from_pretrained` / PEFT read; checked in this order.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "adapter_model.bin")
TOKENIZER_FILE = "tokenizer_config.json"  # written by every tokenizer's save_pretrained


def unreadable(path: str) -> str | None:
    """Why a weights file cannot be read (missing, truncated, not the format its name says), or None if whole."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return f"{name} (missing)"
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "pt"):
                return None
        except (SafetensorError, OSError) as err:
            return f"{name} (unreadable, truncated or corrupted: {err})"
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
            return None
        except (ValueError, OSError) as err:
            return f"{name} (unreadable JSON: {err})"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has lost its directory at the end
        return f"{name} (truncated or not a torch file)"
    return None


def weights_problem(folder: str) -> str | None:
    """None when `folder` holds model weights that can be read: the first of WEIGHT_FILES present, whole (for an
    index, every shard it names); else what is wrong."""
    present = [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))]
    if not present:
        return f"model weights (none of {', '.join(WEIGHT_FILES)})"
    path = os.path.join(folder, present[0])
    problem = unreadable(path)
    if problem is None and present[0].endswith(".index.json"):
        with open(path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        problems = [p for p in (unreadable(os.path.join(folder, s)) for s in shards) if p]
        problem = ", ".join(problems) or None
    return problem


def _sharded_or_deepspeed(folder: str, prefix: str) -> bool:
    """FSDP saves model and optimizer as folders `<prefix>_0`; DeepSpeed saves both in `global_step*`."""
    return bool(glob.glob(os.path.join(folder, f"{prefix}_*")) or glob.glob(os.path.join(folder, "global_step*")))


def _anchor_problem(folder: str, files: tuple[str, str]) -> str | None:
    """θ₀ or F as `files` name it (the whole file, or the per-rank pattern): every piece there and readable."""
    whole, per_rank = files
    pieces = [n for n in os.listdir(folder) if fnmatch.fnmatch(n, rank_files_glob(files))]
    if not pieces:
        return unreadable(os.path.join(folder, whole))
    world = int(re.search(r"-of-(\d+)\.safetensors$", pieces[0]).group(1))
    wanted = [per_rank.format(rank=r, world=world) for r in range(world)]
    problems = [p for p in (unreadable(os.path.join(folder, n)) for n in wanted) if p]
    return ", ".join(problems) or None


def missing_from_checkpoint(
    folder: str, *, save_only_model: bool = False, l2_sp: bool = False, fisher: bool = False, l2_kl: bool = False
) -> list[str]:
    """What `folder` lacks to resume from it, as the Trainer (and L2-SP's θ₀) would read it; [] when complete.

    With `save_only_model` the Trainer saves only weights and state; otherwise also optimizer and scheduler (FSDP
    and DeepSpeed in their own folders), with L2-SP θ₀ (`l2_sp`: one file, or one per rank under FSDP / ZeRO-3),
    with `l2_sp_fisher` also F (`fisher`, in the same layout), and with the output anchor (`l2_kl`) the θ₀ that its
    reference holds beyond the penalty's (one file, or one per rank under FSDP2).
    """
    missing = [p for p in [unreadable(os.path.join(folder, "trainer_state.json"))] if p]
    if not _sharded_or_deepspeed(folder, "pytorch_model_fsdp"):
        problem = weights_problem(folder)
        missing += [problem] if problem else []
    if save_only_model:
        return missing
    if not _sharded_or_deepspeed(folder, "optimizer"):
        optimizer = "optimizer.bin" if os.path.isfile(os.path.join(folder, "optimizer.bin")) else "optimizer.pt"
        missing += [p for p in (unreadable(os.path.join(folder, n)) for n in (optimizer, "scheduler.pt")) if p]
    for wanted, files in ((l2_sp, ANCHOR_FILES), (fisher, FISHER_FILES), (l2_kl, KL_ANCHOR_FILES)):
        problem = _anchor_problem(folder, files) if wanted else None
        missing += [problem] if problem else []
    return missing


def checkpoints_newest_first(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, highest step first (the order `get_last_checkpoint` ranks by)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), m.group(0)) for m in map(CHECKPOINT_NAME.match, os.listdir(output_dir))
             if m and os.path.isdir(os.path.join(output_dir, m.group(0)))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def saved_model_problems(folder: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) about publishing `folder` as a model: errors make it unusable or not a finished model;
    warnings name optional pieces that are absent."""
    errors, warnings = [], []
    if CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(folder))):
        errors.append(
            "it is a checkpoint folder (it holds training state such as the optimizer); push the run's output folder, "
            "or resume the run to its end so that save_model() writes the final model there"
        )
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("config.json", "adapter_config.json")):
        errors.append("no config.json (or adapter_config.json)")
    problem = weights_problem(folder)
    if problem:
        errors.append(f"no readable model weights: {problem}")
    if not os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
        warnings.append(
            f"no tokenizer ({TOKENIZER_FILE}); the repo will hold a model without its tokenizer (save one with "
            "tokenizer.save_pretrained into the folder first if users need it)"
        )
    return errors, warnings
