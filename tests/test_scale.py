"""KD training under fairseq's own distributed training (two CPU processes, gloo) and resuming a KD run
killed with SIGKILL mid-epoch."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import fairseq_kd  # noqa: F401  (torch.load of fairseq checkpoints relies on its allowlist)
from conftest import BIN, PLUGIN, TINY_TRANSFORMER, TRAIN_FLAGS
from test_topk_cache import build_cache

KD = ["--task", "translation_distillation", "--kd-alpha", "0.5", "--kd-temperature", "2", "--dropout", "0"]


def student_command(data_bin, save_dir, *extra):
    return [
        str(BIN / "fairseq-train"), str(data_bin), "--user-dir", PLUGIN, "--arch", "transformer_student_tiny",
        *TINY_TRANSFORMER, *TRAIN_FLAGS, "--criterion", "kd_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--save-dir", str(save_dir), *KD, *map(str, extra),
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("teacher_side", ["online", "cache"])
def test_distributed_kd_training_on_two_cpu_processes(data_bin, teacher, tmp_path, teacher_side):
    if teacher_side == "online":
        side = ["--teacher-path", teacher]
    else:
        build_cache(data_bin, teacher, tmp_path / "cache")
        side = ["--teacher-topk-cache", tmp_path / "cache", "--kd-topk", "4"]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            student_command(data_bin, tmp_path / "ddp", *side, "--max-epoch", "2", "--distributed-backend", "gloo",
                            "--distributed-world-size", "2", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
                            "--distributed-no-spawn", "--distributed-rank", rank, "--ddp-backend", "legacy_ddp"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "distributed init (rank 1)" in logs[0] + logs[1]
    train = [line for line in logs[0].splitlines() if "| train |" in line][-1]
    assert "kd_loss" in train
    # each update takes one batch per worker: an epoch of 17 batches is 9 updates (fairseq pads the shorter
    # shard with an empty batch)
    assert "num_updates 18" in train, train
    assert (tmp_path / "ddp" / "checkpoint_last.pt").exists()


def final_weights(save_dir):
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")["model"]


def test_sigkill_mid_epoch_then_resume_loses_nothing(data_bin, teacher, tmp_path):
    # a data-loading worker process: with --num-workers 0, stock fairseq can abort at exit when
    # --max-update stops it mid-epoch ("terminate called without an active exception")
    # the schedules must continue where they stopped: T runs 2 -> 1 over the 24 updates
    common = ["--teacher-path", teacher, "--max-update", "24", "--save-interval-updates", "6",
              "--keep-interval-updates", "1", "--num-workers", "1", "--kd-temperature-schedule", "linear",
              "--kd-temperature-final", "1", "--kd-selection", "batch", "--kd-selection-rate", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(student_command(data_bin, tmp_path / "straight", *common), check=True, capture_output=True, env=env)

    killed = subprocess.Popen(student_command(data_bin, tmp_path / "killed", *common), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    checkpoint = tmp_path / "killed" / "checkpoint_1_12.pt"  # epoch 1 has 17 updates: 12 is mid-epoch
    deadline = time.time() + 300
    last = tmp_path / "killed" / "checkpoint_last.pt"
    # fairseq writes checkpoint_1_12.pt atomically, then copies it to checkpoint_last.pt (not atomically):
    # kill once the copy is complete
    while killed.poll() is None and time.time() < deadline:
        if checkpoint.exists() and last.exists():
            done, copy = checkpoint.stat(), last.stat()
            if copy.st_mtime >= done.st_mtime and copy.st_size == done.st_size:
                break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert checkpoint.exists() and killed.returncode == -signal.SIGKILL

    resumed = subprocess.run(student_command(data_bin, tmp_path / "killed", *common), capture_output=True, text=True,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Loaded checkpoint" in resumed.stdout and "@ 12 updates" in resumed.stdout
    last_step = [line for line in resumed.stdout.splitlines() if "num_updates=24," in line][0]
    assert f"kd_temperature={2 - 23 / 24:.3f}," in last_step, last_step  # update 24 trains with update_num 23
    straight, restarted = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert straight.keys() == restarted.keys()
    for key in straight:
        torch.testing.assert_close(restarted[key], straight[key], msg=key)


@pytest.mark.parametrize("entry_point", ["fairseq-train", "python -m fairseq_cli.train"])
def test_resumed_run_stops_early_where_an_uninterrupted_one_does(data_bin, tmp_path, entry_point):
    """fairseq-train keeps --patience's count in memory only; the task saves it with each checkpoint. Here the
    best validation "score" is the highest loss, so epoch 1 is the best of a loss that falls every epoch, and
    patience 2 stops after epoch 3, whether or not the run was cut after epoch 2 (restarting the count would
    take epoch 3 as the best and stop after epoch 5)."""
    flags = ["--kd-alpha", "0", "--patience", "2", "--maximize-best-checkpoint-metric"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(*extra):
        command = student_command(data_bin, tmp_path / "cut", *flags, *extra)
        return command if entry_point == "fairseq-train" else [sys.executable, "-m", "fairseq_cli.train", *command[1:]]

    straight = subprocess.run(student_command(data_bin, tmp_path / "straight", *flags, "--max-epoch", "8"),
                              capture_output=True, text=True, env=env)
    subprocess.run(command("--max-epoch", "2"), check=True, capture_output=True, env=env)
    resumed = subprocess.run(command("--max-epoch", "8"), capture_output=True, text=True, env=env)
    losses = [float(loss) for loss in re.findall(r"\| valid on 'valid' subset \| loss ([\d.]+)", straight.stdout)]
    assert losses == sorted(losses, reverse=True) and len(losses) == 3, straight.stdout[-3000:]
    assert "early stop since valid performance hasn't improved for last 2 runs" in resumed.stdout
    assert "Loaded checkpoint" in resumed.stdout and re.findall(r"epoch (\d+) \| valid on", resumed.stdout) == ["003"]
    # the same command once more (as a recipe re-runs a stage cut before its record): it ends as it ended
    checkpoints = {name: (tmp_path / "cut" / name).read_bytes() for name in ("checkpoint_best.pt", "checkpoint_last.pt")}
    again = subprocess.run(command("--max-epoch", "8"), capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "this run stopped early: no better validation for 2 runs" in again.stdout
    assert "valid on" not in again.stdout
    assert checkpoints == {name: (tmp_path / "cut" / name).read_bytes() for name in checkpoints}
