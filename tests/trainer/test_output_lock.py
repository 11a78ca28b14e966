"""One run per output folder: `train()` holds `_hf_l2.lock` (pid and host) in `output_dir`; a second run is refused
in one line naming the folder and the holder, a lock left by a dead process is taken over, and the lock goes away
when training ends, also on an error (issue 24, item 9)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import TokenDataset, l2_args, params_of, run_two_processes, tiny_gpt2
from transformers import TrainerCallback

from hf_l2 import L2Trainer
from hf_l2.output_lock import LOCK_FILE, OutputDirInUseError
from hf_l2.tools.recipe_common import resolve_checkpoint

HOLD = ("import sys, time\nfrom hf_l2.output_lock import holding_output_dir\n"
        "with holding_output_dir(sys.argv[1], True):\n    print('held', flush=True)\n    time.sleep(120)\n")


@pytest.fixture
def other_run(tmp_path):
    """Another process holding `tmp_path/run`'s lock, as a live run's `train()` does; killed at the end."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield holder
    holder.kill()
    holder.wait()


def trainer_in(folder, **overrides) -> L2Trainer:
    args = l2_args(folder, max_steps=2, save_strategy="steps", save_steps=1, **overrides)
    return L2Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())


def test_a_second_run_in_a_live_runs_folder_is_refused_in_one_line(tmp_path, other_run):
    folder = tmp_path / "run"
    trainer = trainer_in(folder)
    start = params_of(trainer.model)
    with pytest.raises(OutputDirInUseError) as err:
        trainer.train()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{folder} is in use by another run (pid {other_run.pid} on {socket.gethostname()}, "
                              f"lock file {folder / LOCK_FILE})")
    assert sorted(os.listdir(folder)) == [LOCK_FILE]  # nothing written, nothing resumed
    assert all(torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())
    assert f'"pid": {other_run.pid}' in (folder / LOCK_FILE).read_text()  # the holder keeps its lock


def test_overwriting_a_live_runs_checkpoints_is_refused(tmp_path, other_run):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir()
    args = l2_args(tmp_path / "run", do_train=True)
    with pytest.raises(OutputDirInUseError, match=rf"pid {other_run.pid}"):
        resolve_checkpoint(args, overwrite_output_dir=True)
    assert checkpoint.is_dir()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}"}}')
    trainer = trainer_in(folder)
    trainer.train()
    assert trainer.state.global_step == 2 and not (folder / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text('{"pid": 1, "host": "elsewhere"}')
    with pytest.raises(OutputDirInUseError, match="pid 1 on elsewhere"):
        trainer_in(folder).train()


class Fail(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("boom")


def test_the_lock_is_released_when_training_fails(tmp_path):
    trainer = trainer_in(tmp_path / "run")
    trainer.add_callback(Fail())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    trainer_in(tmp_path / "run").train()  # the next run is not refused


@pytest.mark.distributed
def test_every_ddp_rank_refuses_a_held_folder(tmp_path, other_run):
    out = tmp_path / "said"
    run_two_processes("lock_worker.py", str(tmp_path / "run"), str(out))
    said = [(tmp_path / f"said.rank{r}").read_text().split("\n", 1) for r in (0, 1)]
    assert [world for world, _ in said] == ["2", "2"]  # two processes really ran
    assert said[0][1] == said[1][1] and said[0][1].startswith(f"{tmp_path / 'run'} is in use by another run "
                                                              f"(pid {other_run.pid} ")

