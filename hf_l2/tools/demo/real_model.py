"""`hf-l2 real-model`: does an anchor beat a smaller learning rate, LoRA or WiSE-FT on a real pretrained LLM?

The model is SmolLM2-135M-Instruct (Q4_1 weights, dequantized: see `smollm2.py`). The task is chat SFT through
`L2SFTTrainer` and the model's chat template: translate English UI messages into German (the gettext pairs of the
demo's data: Django's training messages plus those of JupyterLab, Mercurial, Trac and Plone), scored by chrF and
BLEU (sacreBLEU, greedy decoding) on held-out Django messages. Forgetting is measured two ways:

- Δ cross-entropy on held-out general English text the model is not tuned on (paragraphs of Python's language
  reference), after − before, in nats per token: PEFT's method-comparison definition;
- the instruct probe: accuracy on the questions of `probe.py` that the starting model answers right here.

Methods, all from the same start and data order: `none` at the study's learning rate and at ÷3 and ÷10; `l2_sp`
and `l2_sp_fisher` (F from general text, normalized) at two α; the KL anchor at two λ; WiSE-FT of the `none` run;
LoRA alone and with `l2_lora_delta` at two α. Each finished run is stored as one JSON file under the output
folder and skipped on the next call, so an interrupted study continues where it stopped; the tables and the plot
are recomputed from those files every time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hf_l2.tools.demo.chat_eval import GENERAL_BLOCK, PROMPT, StudyData, evaluate_model
from hf_l2.tools.demo.data import DemoData, DemoDataError, prepare
from hf_l2.tools.demo.float_path import float_path
from hf_l2.tools.demo.smollm2 import DEFAULT_CACHE, WEIGHTS_NOTE, smollm2_folder
from hf_l2.tools.recipe_runs import weights_drift


@dataclass(frozen=True)
class StudySize:
    """Everything that sets the study's cost."""

    steps: int
    batch_size: int
    max_length: int  # tokens of a training conversation (chat template included)
    learning_rate: float  # of full fine-tuning; LoRA runs use `lora_learning_rate`
    lora_learning_rate: float
    seeds: tuple[int, ...]
    translation_eval: int  # held-out Django pairs
    general_blocks: int  # 128-token blocks of general text for the cross-entropy
    fisher_samples: int
    eval_batch_size: int
    wise_ft_weights: tuple[float, ...] = (0.25, 0.5, 0.75)  # t of WiSE-FT of each `none` run
    methods: tuple[str, ...] | None = None  # the names of `methods()` to run; None: all


CPU = StudySize(steps=100, batch_size=8, max_length=64, learning_rate=5e-5, lora_learning_rate=5e-4, seeds=(0,),
                translation_eval=96, general_blocks=48, fisher_samples=64, eval_batch_size=32)
GPU = StudySize(steps=200, batch_size=16, max_length=128, learning_rate=5e-5, lora_learning_rate=5e-4,
                seeds=(0, 1, 2), translation_eval=326, general_blocks=96, fisher_samples=512, eval_batch_size=64)
# `make demo`'s comparison: the four methods of the main question, fewer steps at a higher rate, a smaller
# evaluation (every probe question), in a few minutes on 2 cores.
DEMO = StudySize(steps=24, batch_size=8, max_length=64, learning_rate=2e-4, lora_learning_rate=5e-4,
                 seeds=(0,), translation_eval=32, general_blocks=16, fisher_samples=64, eval_batch_size=32,
                 wise_ft_weights=(0.5,), methods=("none", "l2_sp-1", "kl-1"))
SIZES = {"cpu": CPU, "gpu": GPU, "demo": DEMO}
WISE_FT_WEIGHTS = sorted({t for size in SIZES.values() for t in size.wise_ft_weights})


@dataclass(frozen=True)
class Method:
    """One training configuration of the study (a row of the table, before seeds)."""

    name: str  # unique, used for the run's file name
    label: str  # what the table and plot show
    curve: str  # the method it belongs to on the frontier
    lr_factor: float = 1.0
    l2_mode: str = "none"
    l2_coef: float = 0.0
    kl_coef: float = 0.0
    dft: bool = False  # with `kl_coef`: Anchored SFT
    lora: bool = False
    lora_delta: bool = False


def methods() -> list[Method]:
    """The study's methods, in the order they run: the comparisons that decide the verdict first, so that an
    interrupted study has them. Each anchor at two strengths, a weak one and one ten times stronger; ASFT also at
    λ = 0 (DFT alone) and LLaMA-Factory's default λ = 0.1."""
    return [
        Method("none", "none", "none"),
        Method("none-lr10", "none, lr ÷ 10", "lower lr", lr_factor=1 / 10),
        Method("l2_sp-0.1", "l2_sp α=0.1", "l2_sp", l2_mode="l2_sp", l2_coef=0.1),
        Method("kl-1", "KL λ=1", "KL anchor", kl_coef=1.0),
        Method("lora", "LoRA r=16", "LoRA", lora=True),
        Method("asft-0", "ASFT λ=0", "ASFT", dft=True),  # DFT alone
        Method("asft-0.1", "ASFT λ=0.1", "ASFT", kl_coef=0.1, dft=True),
        Method("asft-1", "ASFT λ=1", "ASFT", kl_coef=1.0, dft=True),
        Method("none-lr3", "none, lr ÷ 3", "lower lr", lr_factor=1 / 3),
        Method("l2_sp-1", "l2_sp α=1", "l2_sp", l2_mode="l2_sp", l2_coef=1.0),
        Method("kl-4", "KL λ=4", "KL anchor", kl_coef=4.0),
        Method("asft-4", "ASFT λ=4", "ASFT", kl_coef=4.0, dft=True),
        Method("l2_sp_fisher-0.1", "l2_sp_fisher α=0.1", "l2_sp_fisher", l2_mode="l2_sp_fisher", l2_coef=0.1),
        Method("lora_delta-0.1", "LoRA + l2_lora_delta α=0.1", "LoRA + l2_lora_delta", l2_mode="l2_sp",
               l2_coef=0.1, lora=True, lora_delta=True),
        Method("l2_sp_fisher-1", "l2_sp_fisher α=1", "l2_sp_fisher", l2_mode="l2_sp_fisher", l2_coef=1.0),
        Method("lora_delta-1", "LoRA + l2_lora_delta α=1", "LoRA + l2_lora_delta", l2_mode="l2_sp", l2_coef=1.0,
               lora=True, lora_delta=True),
    ]


CURVES = ("none", "lower lr", "WiSE-FT", "l2_sp", "l2_sp_fisher", "KL anchor", "ASFT", "LoRA",
          "LoRA + l2_lora_delta")


def study_data(data: DemoData, size: StudySize) -> StudyData:
    def pairs(part: str) -> list[tuple[str, str]]:
        rows = [json.loads(line)["translation"] for line in data.translation(part).open(encoding="utf-8")]
        return [(r["en"], r["de"]) for r in rows]

    def lines(part: str) -> list[str]:
        return data.generation(part).read_text(encoding="utf-8").splitlines()

    # Django's training messages and the other projects' messages, one shuffled set (fixed order).
    train = pairs("target_train") + pairs("pretrain_train")
    train = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()]
    return StudyData(train, pairs("target_validation")[: size.translation_eval], lines("pretrain_validation"),
                     lines("pretrain_train"))


# --- training -----------------------------------------------------------------------------------------------------


def train_run(method: Method, seed: int, start: Path, data: StudyData, size: StudySize, work: Path) -> dict:
    """Fine-tune one method from ``start``; its evaluation, drift, time per step and the final loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_l2.integrations.trl import L2SFTConfig, L2SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    rows = [{"prompt": [{"role": "user", "content": PROMPT.format(en)}],
             "completion": [{"role": "assistant", "content": de}]} for en, de in data.train]
    lr = (size.lora_learning_rate if method.lora else size.learning_rate) * method.lr_factor
    config = L2SFTConfig(
        output_dir=str(work), max_steps=size.steps, per_device_train_batch_size=size.batch_size,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=seed,
        max_length=size.max_length, bf16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_pin_memory=False,
        l2_mode=method.l2_mode, l2_coef=method.l2_coef, l2_kl_coef=method.kl_coef, l2_lora_delta=method.lora_delta,
        l2_fisher_samples=size.fisher_samples, l2_token_weighting="dft" if method.dft else "none",
    )
    extra = {}
    if method.l2_mode == "l2_sp_fisher":
        extra["fisher_dataset"] = general_blocks_dataset(tokenizer, data.general_fisher, size.fisher_samples)
    if method.lora:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                          task_type="CAUSAL_LM")
    trainer = L2SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                           processing_class=tokenizer, **extra)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    trained = trainer.model.merge_and_unload() if method.lora else trainer.model
    metrics = evaluate(trained, tokenizer, data, size)
    return {**metrics, "train_loss": result.training_loss, "train_seconds": seconds,
            "final_weights": trained.state_dict()}


def evaluate(model, tokenizer, data: StudyData, size: StudySize) -> dict:
    return evaluate_model(model, tokenizer, data, size.eval_batch_size, size.general_blocks)


def general_blocks_dataset(tokenizer, texts: list[str], count: int):
    """General-text blocks as `input_ids` rows (the Fisher data: TRL's collator makes every token a label)."""
    from datasets import Dataset

    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + GENERAL_BLOCK] for i in range(0, len(ids) - GENERAL_BLOCK + 1, GENERAL_BLOCK)][:count]
    dataset = Dataset.from_dict({"input_ids": blocks})
    dataset.l2_fisher_description = f"{len(blocks)} blocks of {GENERAL_BLOCK} tokens of Python's language reference"
    return dataset


def wise_ft(start_weights: dict[str, torch.Tensor], final: dict[str, torch.Tensor], t: float) -> dict:
    """WiSE-FT (Wortsman et al., CVPR 2022): (1 − t)·θ₀ + t·θ, weight by weight."""
    return {n: torch.lerp(start_weights[n].float(), final[n].float(), t) if n in start_weights else final[n]
            for n in final}


# --- the study ----------------------------------------------------------------------------------------------------


def run_study(output_dir: str | Path, cache_dir: str | Path, size: StudySize,
              only: list[str] | None = None) -> Path:
    """Run every method (skipping those already stored), then write the report; return `results.md`'s path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    start = smollm2_folder(cache_dir)
    data = study_data(prepare(cache_dir), size)
    tokenizer = AutoTokenizer.from_pretrained(start)
    start_file = output_dir / "runs" / "start.json"
    start_model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    start_weights = {n: w.detach().clone() for n, w in start_model.state_dict().items()}
    if not start_file.is_file():
        t0 = time.perf_counter()
        _store(start_file, {"method": "start", "seed": None, **evaluate(start_model, tokenizer, data, size),
                            "drift": 0.0, "eval_seconds": time.perf_counter() - t0})
        _progress(start_file)
    del start_model
    # Seed by seed, so that a study stopped early has whole frontiers of its first seeds.
    todo = [(m, s) for s in size.seeds for m in methods()
            if (size.methods is None or m.name in size.methods) and (only is None or m.name in only)]
    for method, seed in todo:
        path = output_dir / "runs" / f"{method.name}-seed{seed}.json"
        if path.is_file():
            continue
        result = train_run(method, seed, start, data, size, output_dir / "work")
        final = result.pop("final_weights")
        _store(path, {"method": method.name, "seed": seed, **result, "drift": weights_drift(final, start_weights),
                      "learning_rate": (size.lora_learning_rate if method.lora else size.learning_rate)
                      * method.lr_factor})
        _progress(path)
        if method.name == "none":
            wise_ft_runs(final, start_weights, start, seed, tokenizer, data, size, output_dir)
        del final, result
        gc.collect()
    return write_study_report(output_dir, size)


def wise_ft_runs(final, start_weights, start: Path, seed: int, tokenizer, data, size, output_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    for t in size.wise_ft_weights:
        path = output_dir / "runs" / f"wise_ft-{t:g}-seed{seed}.json"
        if path.is_file():
            continue
        weights = wise_ft(start_weights, final, t)
        model.load_state_dict(weights)
        _store(path, {"method": f"wise_ft-{t:g}", "seed": seed, **evaluate(model, tokenizer, data, size),
                      "drift": weights_drift(weights, start_weights)})
        _progress(path)


def _store(path: Path, row: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.rename(path)  # a stored run is always complete


def _progress(path: Path) -> None:
    row = json.loads(path.read_text(encoding="utf-8"))
    timing = f", {row['train_seconds']:.0f} s training" if "train_seconds" in row else ""
    print(f"{row['method']} seed {row['seed']}: chrF {row['chrf']:.1f}, BLEU {row['bleu']:.1f}, general CE "
          f"{row['general_ce']:.4f}, probe {sum(row['probe'])}/{len(row['probe'])}{timing}", flush=True)


# --- report ---------------------------------------------------------------------------------------------------------


def load_rows(output_dir: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((output_dir / "runs").glob("*.json"))]


def summarize(rows: list[dict]) -> tuple[dict, list[dict]]:
    """The starting model's row and, per method, mean and std over seeds of each measure; the probe counts only
    the questions the starting model answers right."""
    start = next(r for r in rows if r["method"] == "start")
    kept = [i for i, ok in enumerate(start["probe"]) if ok]
    labels = {m.name: (m.label, m.curve) for m in methods()}
    labels.update({f"wise_ft-{t:g}": (f"WiSE-FT of none, t={t:g}", "WiSE-FT") for t in WISE_FT_WEIGHTS})
    summary = []
    for name, (label, curve) in labels.items():
        runs = [r for r in rows if r["method"] == name]
        if not runs:
            continue
        values = {
            "chrf": [r["chrf"] for r in runs], "bleu": [r["bleu"] for r in runs],
            "delta_ce": [r["general_ce"] - start["general_ce"] for r in runs],
            # No question the start answers (a stand-in model) leaves nothing to forget: NaN, not a percentage.
            "probe": [100 * sum(r["probe"][i] for i in kept) / len(kept) if kept else math.nan for r in runs],
            "drift": [r["drift"] for r in runs],
        }
        summary.append({"name": name, "label": label, "curve": curve, "seeds": len(runs),
                        **{k: _mean_std(v) for k, v in values.items()}})
    summary.sort(key=lambda s: CURVES.index(s["curve"]))  # stable: strengths stay in order within a curve
    return {**start, "kept": len(kept)}, summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _cell(value: tuple[float, float], digits: int, seeds: int) -> str:
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def write_study_report(output_dir: Path, size: StudySize) -> Path:
    rows = load_rows(output_dir)
    start, summary = summarize(rows)
    lines = [
        "# Real model: SmolLM2-135M-Instruct, chat SFT en→de on UI messages", "",
        (f"Weights: {WEIGHTS_NOTE}. {size.steps} steps, batch {size.batch_size}, at most {size.max_length} tokens, "
        f"learning rate {size.learning_rate:g} (LoRA {size.lora_learning_rate:g}), constant, no weight decay; seeds "
        f"{list(size.seeds)}. Target: chrF / BLEU on {size.translation_eval} held-out Django "
        f"messages (greedy). Forgetting: Δ cross-entropy on general English text (after − before, nats/token; start "
        f"{start['general_ce']:.4f}) and probe accuracy on the {start['kept']} of {len(start['probe'])} questions the "
        f"starting model answers right here. Start: chrF {start['chrf']:.1f}, BLEU {start['bleu']:.1f}. "
        f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{float_path()}."), "",
        "| method | chrF ↑ | BLEU ↑ | Δ CE general ↓ | probe % ↑ | ‖θ − θ₀‖ |",
        "|---|---:|---:|---:|---:|---:|",
        f"| *start* | {start['chrf']:.1f} | {start['bleu']:.1f} | 0 | 100 | 0 |",
    ]
    for s in summary:
        n = s["seeds"]
        lines.append(f"| {s['label']} | {_cell(s['chrf'], 1, n)} | {_cell(s['bleu'], 1, n)} | "
                     f"{_cell(s['delta_ce'], 4, n)} | {_cell(s['probe'], 0, n)} | {_cell(s['drift'], 2, n)} |")
    path = output_dir / "results.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(start, summary, output_dir / "results.png")
    with open(output_dir / "results.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "examples"}, ensure_ascii=False) + "\n"
                     for r in rows)
    return path


def _point_label(point: dict) -> str:
    """What tells a point from the others of its curve: "t=0.5", "α=0.1", "lr ÷ 10" (nothing for a lone point)."""
    label = point["label"]
    if label == point["curve"]:
        return ""
    return label.rsplit(", ", 1)[-1] if ", " in label else label.rsplit(" ", 1)[-1]


def _plot(start: dict, summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, xlabel in ((axes[0], "delta_ce", "Δ cross-entropy on general text (nats) ← less forgetting"),
                            (axes[1], "probe", "probe accuracy (%) → less forgetting")):
        for curve in dict.fromkeys(s["curve"] for s in summary):
            points = [s for s in summary if s["curve"] == curve]
            ax.errorbar([p[key][0] for p in points], [p["chrf"][0] for p in points],
                        xerr=[p[key][1] for p in points], yerr=[p["chrf"][1] for p in points],
                        marker="o", capsize=3, label=curve)
            for p in points:
                ax.annotate(_point_label(p), (p[key][0], p["chrf"][0]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.plot([0.0 if key == "delta_ce" else 100.0], [start["chrf"]], "k*", markersize=10, label="start")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("chrF on held-out Django messages ↑")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1, dequantized): target vs forgetting")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------------------------------------


def add_real_model_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("real-model", help="The real-model study (SmolLM2-135M-Instruct, offline).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/real_model", help="Runs (one JSON each), table and plot.")
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE, help="The model folder and the prepared data.")
    parser.add_argument("--size", choices=list(SIZES), default="cpu",
                        help="cpu: 1 seed, 100 steps of 8 × 64 tokens (about 2 hours on 2 idle cores); gpu: 3 seeds, "
                        "200 steps of 16 × 128 tokens; demo: `make demo`'s comparison (none, l2_sp, KL, WiSE-FT).")
    parser.add_argument("--steps", type=int, default=None, help="Override the size's steps.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Override the size's seeds.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--methods", nargs="+", default=None, choices=[m.name for m in methods()],
                        help="Run only these methods (the report still shows every stored run).")
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    if args.steps is not None:
        size = replace(size, steps=args.steps)
    if args.seeds is not None:
        size = replace(size, seeds=tuple(args.seeds))
    try:
        path = run_study(args.output_dir, args.cache_dir, size, args.methods)
    except DemoDataError as err:
        sys.exit(f"error: {err}")
    print(path.read_text(encoding="utf-8"))
    return 0

