"""hf_l2 installed from its built wheel into a fresh virtual environment, with this checkout out of reach.

Slow (a venv and a full install, minutes): deselected by default, run by CI (`python -m pytest -m slow`).
"""

from __future__ import annotations

import json
import os
import subprocess
import venv

import pytest
from helpers import ROOT, build_wheel, save_tiny_gpt2, tiny_demo_sizes, write_text_files
from huggingface_hub import ModelCard

pytestmark = pytest.mark.slow
TINY = tiny_demo_sizes()  # the test suite's demo sizes

# The environment `make` pins, so that pip installs from its cache what this test environment already has.
CONSTRAINTS = ROOT / "constraints" / "demo.txt"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding hf_l2[demo] from the wheel, a work folder outside the checkout, its env)."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    venv.create(root / "venv", with_pip=True)
    python = str(root / "venv" / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    install = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(CONSTRAINTS)]
    subprocess.run(install + ["torch"], check=True, env=env, cwd=root)
    subprocess.run(install + [f"hf_l2[demo] @ {wheel.as_uri()}"], check=True, env=env, cwd=root)
    work = root / "work"
    work.mkdir()
    return python, work, env


def run(installed, *args: str) -> str:
    python, work, env = installed
    result = subprocess.run([python, *args], capture_output=True, text=True, env=env, cwd=work, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_package_comes_from_the_venv_not_the_checkout(installed):
    python, work, _ = installed
    where = json.loads(run(installed, "-c", "import json, hf_l2, hf_l2.recipes, hf_l2.model_cards; "
                                            "print(json.dumps([hf_l2.__file__, hf_l2.recipes.__file__]))"))
    venv_root = os.path.dirname(os.path.dirname(python))
    assert all(path.startswith(venv_root) and not path.startswith(str(ROOT)) for path in where)
    configs = run(installed, "-c", "import importlib.resources as r; d = r.files('hf_l2.recipes'); "
                                   "print(sorted(p.name for s in ('configs', 'accelerate_configs') "
                                   "for p in (d / s).iterdir()))")
    assert "gpt2_generation.yaml" in configs and "fsdp2.yaml" in configs


def test_sweep_and_a_recipe_run_from_the_wheel_and_write_their_cards(installed):
    _, work, _ = installed
    model, text = save_tiny_gpt2(work / "gpt2"), write_text_files(work / "text")
    data = ["--model_name_or_path", str(model), "--train_file", str(text["txt"]), "--validation_file",
            str(text["validation"]), "--block_size", "32", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--use_cpu", "true", "--report_to", "none"]
    # The console script, as a user types it.
    bin_dir = os.path.dirname(installed[0])
    out = subprocess.run([os.path.join(bin_dir, "hf-l2"), "sweep", "--recipe", "gpt2_generation", "--l2_mode", "none",
                          "l2_sp", "--l2_coef", "0.1", "--seeds", "0", "--output_dir", "sweep", "--", *data],
                         capture_output=True, text=True, env=installed[2], cwd=work, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [row["setting"] for row in rows] == ["start", "none", "l2_sp α=0.1"]
    assert rows[0]["drift"] == 0 and all(row["drift"] > 0 and row["eval_loss"] > 0 for row in rows[1:])
    assert "| l2_sp α=0.1 | 1 |" in out.stdout

    run(installed, "-m", "hf_l2.recipes.gpt2_generation", *data, "--output_dir", "module-run", "--l2_mode", "l2_sp",
        "--l2_coef", "0.1", "--num_samples", "1")
    card = ModelCard.load(work / "module-run" / "README.md")
    assert "l2-sp" in card.data.tags and "python -m hf_l2.recipes.gpt2_generation" in card.text


def test_a_reduced_demo_runs_from_the_wheel(installed):
    _, work, _ = installed
    code = ("from hf_l2.tools.demo import FineTuning, Sizes, run_demo\n"
            "from hf_l2.tools.demo.starting_models import Pretraining\n"
            f"print(run_demo('demo', 'demo/cache', modes=('none', 'l2_sp'), coefs=(1.0,), seeds=(0,), sizes={TINY!r}, "
            "kl_coefs=(), wise_ft_weights=(), jobs=2))")
    report = work / run(installed, "-c", code).strip().splitlines()[-1]
    assert report == work / "demo" / "demo.md"
    for task in ("generation", "translation"):
        table = (work / "demo" / task / "results.md").read_text()
        rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")][2:]
        assert rows == ["start", "none", "l2_sp α=1"]
        assert f"![{task}]({task}/results.png)" in report.read_text()
