"""The trainer as users run it: `accelerate launch` with two CPU processes, and Ctrl-C mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_fixtures import tiny_kit  # noqa: F401
from tests.train_helpers import write_config

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_cpu_processes_agree_on_multipliers_and_weights(tiny_kit, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    config = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=2)
    # accelerate 1.15 runs `--cpu --num_processes 2` as ONE process; two CPU ranks (gloo) need --multi_gpu with
    # ACCELERATE_USE_CPU=1 (or torchrun).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "train_surge_sdxl.py"), "--config_file", str(config)]
    env = _env() | {"ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["multipliers"] == records[1]["multipliers"]
    assert records[0]["targets"] == records[1]["targets"]
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    assert records[0]["global_step"] == records[1]["global_step"] == 2
    assert records[0]["local_parameters"] == records[0]["parameters"]  # DDP: every rank holds the whole student
    assert (out / "dev.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("config_name", ["fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_backends_agree_across_ranks(tiny_kit, tmp_path, config_name):  # noqa: F811
    """examples/accelerate FSDP and DeepSpeed configs: 2 ranks train, the controller's multipliers agree."""
    import importlib.util

    import torch

    if config_name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed; its ZeRO configs here target GPUs)")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: on CPU ranks accelerate 1.15 refuses FSDP ('no available devices found') or runs it "
                    "as DDP (MULTI_CPU), so the config cannot shard on CPU ranks")
    out = tmp_path / "out"
    config = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=2)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "examples" / "accelerate" / config_name), str(REPO / "train_surge_sdxl.py"),
               "--config_file", str(config), "--surge_replay_units", "0", "--optimizer_type", "AdamW",
               "--optimizer_args"]  # the config's args are ADA_SURGE's: none for AdamW
    result = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["multipliers"] == records[1]["multipliers"]
    assert records[0]["global_step"] == records[1]["global_step"] == 2
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]  # the gathered weights agree
    if config_name != "deepspeed_zero2.yaml":  # FSDP and ZeRO-3 shard the weights: each rank holds about half
        assert all(r["local_parameters"] < 0.6 * r["parameters"] for r in records), records
    assert (out / "dev.safetensors").is_file()


@pytest.mark.slow
def test_ctrl_c_saves_state_that_resumes(tiny_kit, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    config = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=400)
    command = [sys.executable, str(REPO / "train_surge_sdxl.py"), "--config_file", str(config)]
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:  # wait for the first optimizer step
            if "kd=" in log_path.read_text(errors="replace"):
                break
            time.sleep(0.5)
        assert process.poll() is None, log_path.read_text()[-3000:]
        process.send_signal(signal.SIGINT)
        process.wait(timeout=600)
    log = log_path.read_text(errors="replace")
    assert process.returncode == 130, log[-3000:]
    state = out / "dev-interrupted-state"
    assert (state / "surge_progress.json").is_file(), log[-3000:]
    stopped_at = json.loads((state / "surge_progress.json").read_text())["global_step"]
    assert 1 <= stopped_at < 400
    assert not (out / "dev.safetensors").exists()  # no final model from an interrupted run

    resumed = subprocess.run(command + ["--resume", str(state), "--max_train_steps", str(stopped_at + 1)],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((out / "ranks" / "rank0.json").read_text())["global_step"] == stopped_at + 1
    assert (out / "dev.safetensors").is_file()
