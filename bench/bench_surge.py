"""Benchmark (not a test): does surge reach a teacher-matching target in fewer steps and less wall time?

Side by side in one run, on the tiny kit, same student, teacher, data and held-out probes for every method:

  surge          ADA_SURGE + Cascade + per-unit LR controller + unit replay + trajectory loss
  adamw_kd       AdamW, task + output KD (what people do today with kohya + a teacher)
  adafactor_kd   Adafactor (kohya's recommended fixed-LR settings), task + output KD
  bksdm          AdamW, task + output KD + feature KD on every unit, equal weights (BK-SDM)
  ablations      surge_random_lr (random per-unit LRs), surge_no_replay, surge_no_cascade,
                 surge_no_controller (every multiplier stays 1); variant surge_keep_mean (targets at mean 1,
                 run with --ablations surge_keep_mean)

Tasks: (a) student = base, teacher = base + a LoRA trained on the data (hooked, never merged);
       (b) BK-SDM-Small student (one layer fewer per stage, no mid block, kept layers copied from the
           teacher, units aligned stage by stage) vs the full teacher;
       (a_large) task (a) on a second, larger tiny config (2x widths, deeper attention, pre-trained here).
Metric: held-out noise-prediction MSE between student and teacher on fixed probes, measured every
`--eval_every` steps; threshold = `--target` × the starting MSE (one table per target). Reported per
method: steps and wall seconds to the threshold (teacher flavor capture charged to surge and its ablations only: the KD
baselines do not need it), median over seeds, and the ratio to
adamw_kd. Runs that never reach the threshold count as not reached (shown as ">max").

    python bench/bench_surge.py --seeds 5 --max_steps 150
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sd_scripts_surge.config import parse_train_args  # noqa: E402
from sd_scripts_surge.training.train import train  # noqa: E402

COMMON = [
    "--seed", "{seed}", "--max_train_steps", "{max_steps}", "--train_batch_size", "4",
    "--surge_eval_every_n_steps", "{eval_every}", "--surge_probes", "4", "--surge_num_seeds", "2",
    "--save_precision", "float", "--sample_every_n_epochs", "0",
    # Pure distillation for every method: the metric is teacher matching, so no denoising term.
    "--surge_w_task", "0", "--surge_w_out", "1",
]
METHODS: dict[str, list[str]] = {
    "surge": ["--optimizer_type", "ADA_SURGE", "--optimizer_args", "relative_step=False", "scale_parameter=False",
              "warmup_init=False", "--lr_scheduler", "cascade", "--lr_scheduler_num_cycles", "2",
              "--lr_warmup_steps", "5", "--surge_traj_weight", "0.5", "--surge_replay_units", "2",
              "--surge_replay_steps", "20"],
    "adamw_kd": ["--optimizer_type", "AdamW", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5",
                 "--surge_controller", "false", "--surge_replay_units", "0", "--surge_traj_weight", "0"],
    "adafactor_kd": ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
                     "scale_parameter=False", "warmup_init=False", "--lr_scheduler", "constant_with_warmup",
                     "--lr_warmup_steps", "5", "--surge_controller", "false", "--surge_replay_units", "0",
                     "--surge_traj_weight", "0"],
    "bksdm": ["--optimizer_type", "AdamW", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5",
              "--surge_controller", "false", "--surge_replay_units", "0", "--surge_traj_weight", "0",
              "--surge_feature_weight", "1.0"],
}
def _with(recipe: list[str], **flags: str) -> list[str]:
    """`recipe` with each --flag set to the given value (replaced if present, appended if not)."""
    out = list(recipe)
    for name, value in flags.items():
        flag = f"--{name}"
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


# The candidate recipe of issue 17: surge's parts on the optimizer and schedule that win the baseline sweep
# (AdamW, constant LR after warmup), the controller acting from the first step (lr_rule measured), at mean LR 1
# (keep_mean), re-measured every 10 steps from the probes, trajectory loss and replay as in surge.
METHODS["surge_adamw"] = [
    "--optimizer_type", "AdamW", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5",
    "--surge_lr_rule", "measured", "--surge_keep_mean_lr", "true", "--surge_update_every_n_steps", "10",
    "--surge_traj_weight", "0.5", "--surge_replay_units", "2", "--surge_replay_steps", "20"]
# The recipe the surge_adamw ablations point to (task q): the design's anchored rule and once-per-epoch updates
# (the measured rule and 10-step updates cost accuracy there), all-unit teacher-forced replay (the largest gain),
# and the teacher answered up front (cached targets: same accuracy, less wall time).
METHODS["surge_tuned"] = _with(METHODS["surge_adamw"], surge_lr_rule="anchored", surge_update_every_n_steps="0",
                               surge_replay_mode="all", surge_teacher="cached", surge_target_draws="1")
BASELINES = ("adamw_kd", "adafactor_kd", "bksdm")


ABLATIONS: dict[str, list[str]] = {
    # each part of the candidate recipe switched off (or back to the earlier rule), everything else kept
    "surge_adamw_no_controller": _with(METHODS["surge_adamw"], surge_controller="false"),
    "surge_adamw_random_lr": _with(METHODS["surge_adamw"], surge_random_lr="true"),
    "surge_adamw_anchored": _with(METHODS["surge_adamw"], surge_lr_rule="anchored"),
    "surge_adamw_no_keep_mean": _with(METHODS["surge_adamw"], surge_keep_mean_lr="false"),
    "surge_adamw_epoch_updates": _with(METHODS["surge_adamw"], surge_update_every_n_steps="0"),
    "surge_adamw_no_traj": _with(METHODS["surge_adamw"], surge_traj_weight="0"),
    "surge_adamw_no_replay": _with(METHODS["surge_adamw"], surge_replay_units="0"),
    "surge_adamw_replay_all": _with(METHODS["surge_adamw"], surge_replay_mode="all"),
    # the teacher answered up front (one (t, ε) draw per image, reused every epoch) instead of every step
    "surge_adamw_cached": _with(METHODS["surge_adamw"], surge_teacher="cached", surge_target_draws="1"),
    "surge_tuned_no_controller": _with(METHODS["surge_tuned"], surge_controller="false"),
    # how many replay steps per unit pay for themselves (issue 17 item 3): none, 20 (the recipe), 50, 100, 200, at
    # the default replay LR (learning_rate × 0.1) and at 1e-3 (a third of task q's best learning rate, 3e-3)
    "surge_tuned_no_replay": _with(METHODS["surge_tuned"], surge_replay_units="0"),
    "surge_tuned_rlr1e-3": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3"),
    # replay on half of the cached batch per step (the bench's flavors are one batch of 8): half the cost a step
    "surge_tuned_rlr1e-3_rb4": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3", surge_replay_batch="4"),
    "surge_tuned_rlr1e-3_rb4_40": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3", surge_replay_batch="4",
                                        surge_replay_steps="40"),
    # the same, with the teacher's answers filled on first use instead of up front (same values, nothing waits)
    "surge_tuned_rlr1e-3_rb4_40_fu": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3", surge_replay_batch="4",
                                           surge_replay_steps="40", surge_target_fill="first_use"),
    "adamw_kd_cached_fu": _with(METHODS["adamw_kd"], surge_teacher="cached", surge_target_draws="1",
                                surge_target_fill="first_use"),
    # unit LERP toward a same-architecture teacher checkpoint (task q only: a hooked LoRA teacher has no separate
    # weights to LERP toward), after the half-batch replay, each unit kept only if its downstream error drops
    "surge_tuned_rlr1e-3_rb4_lerp0.5": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3", surge_replay_batch="4",
                                             surge_lerp_alpha="0.5"),
    "surge_tuned_rlr1e-3_rb4_lerp1": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3", surge_replay_batch="4",
                                           surge_lerp_alpha="1"),
    # LERP with the teacher's answers filled on first use; without replay; replaying and LERPing at step 0 only
    "surge_tuned_rlr1e-3_rb4_lerp1_fu": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3", surge_replay_batch="4",
                                              surge_lerp_alpha="1", surge_target_fill="first_use"),
    # LERP before the replay: the units whose teacher copy is kept are left out of the replay (--surge_lerp_first)
    "surge_tuned_rlr1e-3_rb4_lerp1_fu_first": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3",
                                                    surge_replay_batch="4", surge_lerp_alpha="1",
                                                    surge_target_fill="first_use", surge_lerp_first="true"),
    "surge_tuned_rlr1e-3_rb4_lerp0.5_fu": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3",
                                                surge_replay_batch="4", surge_lerp_alpha="0.5",
                                                surge_target_fill="first_use"),
    "surge_tuned_lerp1_fu_no_replay": _with(METHODS["surge_tuned"], surge_replay_units="0", surge_lerp_alpha="1",
                                            surge_target_fill="first_use"),
    "surge_tuned_rlr1e-3_rb4_lerp1_fu_once": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3",
                                                   surge_replay_batch="4", surge_lerp_alpha="1",
                                                   surge_target_fill="first_use", surge_replay_epochs="1"),
    "surge_tuned_replay50": _with(METHODS["surge_tuned"], surge_replay_steps="50"),
    "surge_tuned_replay100": _with(METHODS["surge_tuned"], surge_replay_steps="100"),
    "surge_tuned_replay50_rlr1e-3": _with(METHODS["surge_tuned"], surge_replay_steps="50", surge_replay_lr="1e-3"),
    "surge_tuned_replay100_rlr1e-3": _with(METHODS["surge_tuned"], surge_replay_steps="100",
                                           surge_replay_lr="1e-3"),
    "surge_tuned_replay200_rlr1e-3": _with(METHODS["surge_tuned"], surge_replay_steps="200",
                                           surge_replay_lr="1e-3"),
    # replay at the first epoch start only (the second, at step 48, costs the wall time of ~35 training steps)
    "surge_tuned_rlr1e-3_replay_once": _with(METHODS["surge_tuned"], surge_replay_lr="1e-3", surge_replay_epochs="1"),
    "surge_tuned_replay50_rlr1e-3_once": _with(METHODS["surge_tuned"], surge_replay_steps="50", surge_replay_lr="1e-3",
                                               surge_replay_epochs="1"),
    # the same cache under the AdamW KD baseline: how much of a gain is the cache, not surge (takes adamw_kd's LR)
    "adamw_kd_cached": _with(METHODS["adamw_kd"], surge_teacher="cached", surge_target_draws="1"),
    "surge_adamw_on_ada_surge": _with(METHODS["surge_adamw"], optimizer_type="ADA_SURGE") + [
        "--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False"],
    "surge_random_lr": METHODS["surge"] + ["--surge_random_lr", "true"],
    "surge_no_replay": METHODS["surge"] + ["--surge_replay_units", "0"],
    "surge_no_cascade": [a if a != "cascade" else "cosine_with_restarts" for a in METHODS["surge"]],
    # not asked for by the issue; isolates the controller (all multipliers stay 1, everything else as surge)
    "surge_no_controller": METHODS["surge"] + ["--surge_controller", "false"],
    # a variant, not an ablation: targets rescaled to mean 1 (redistribute LR between units, do not lower it)
    "surge_keep_mean": METHODS["surge"] + ["--surge_keep_mean_lr", "true"],
}


def parent_method(name: str) -> str:
    """The swept method whose best LR an ablation or variant reuses (ablations are not swept themselves)."""
    if name in METHODS:
        return name
    for parent in sorted(METHODS, key=len, reverse=True):
        if name.startswith(parent + "_"):
            return parent
    return "surge"


def _quiet_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def train_lora_teacher(kit, work: Path, steps: int, base: Path | None = None, name: str = "teacher_lora") -> Path:
    """Task (a)'s teacher: a LoRA trained on the data by our own trainer (plain fine-tune, no teacher)."""
    out = work / name
    path = out / f"{name}.safetensors"
    if path.exists():
        return path
    argv = ["--pretrained_model_name_or_path", str(base or kit.base_dir), "--dataset_config", str(kit.dataset_toml),
            "--output_dir", str(out), "--output_name", name, "--surge", "false",
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
            "--optimizer_type", "AdamW", "--learning_rate", "5e-3", "--max_train_steps", str(steps),
            "--train_batch_size", "4", "--seed", "7"]
    _quiet_accelerate()
    train(parse_train_args(argv))
    return path


def dataset_with_repeats(toml_path: Path, work: Path, repeats: int) -> Path:
    """The kit's dataset TOML with every subset's num_repeats set to `repeats` (0: unchanged)."""
    if not repeats:
        return toml_path
    import re

    text = re.sub(r"num_repeats = \d+", f"num_repeats = {repeats}", toml_path.read_text())
    out = work / f"dataset-repeats{repeats}.toml"
    out.write_text(text)
    return out


def make_pruned_student(kit, work: Path) -> Path:
    """Task (b)'s student: BK-SDM-Small pruning of the teacher (one layer fewer per stage, no mid block),
    every kept layer initialised from the teacher (`sd_scripts_surge.models.prune`)."""
    from sd_scripts_surge.models.prune import prune_pipeline_folder

    folder = work / "pruned_student_bk_small"
    if (folder / "unet" / "config.json").exists():
        return folder
    return prune_pipeline_folder(kit.teacher_dir, folder, layers_per_block=1, drop_mid=True)


LARGE_UNET = {"block_out_channels": (64, 128, 128), "transformer_layers_per_block": (1, 2, 2),
              "attention_head_dim": (2, 4, 8)}


def make_large_base(kit, work: Path, steps: int) -> Path:
    """The second, larger tiny config: 2× the widths and deeper attention, pre-trained from scratch by our own
    trainer (plain fine-tune) on the kit's data for `steps` steps, written as a diffusers folder."""
    from diffusers import UNet2DConditionModel

    from sd_scripts_surge.tiny.architecture import tiny_unet_config

    done = work / "large_base" / "large_base"
    if (done / "unet" / "config.json").exists():
        return done
    init = work / "large_init"
    shutil.rmtree(init, ignore_errors=True)
    shutil.copytree(kit.base_dir, init, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(11)
    UNet2DConditionModel.from_config({**tiny_unet_config(), **LARGE_UNET}).save_pretrained(init / "unet")
    argv = ["--pretrained_model_name_or_path", str(init), "--dataset_config", str(kit.dataset_toml),
            "--output_dir", str(work / "large_base"), "--output_name", "large_base", "--surge", "false",
            "--save_model_as", "diffusers", "--optimizer_type", "AdamW", "--learning_rate", "1e-3",
            "--lr_scheduler", "cosine", "--max_train_steps", str(steps), "--train_batch_size", "8", "--seed", "11",
            "--sample_every_n_epochs", "0"]
    _quiet_accelerate()
    train(parse_train_args(argv))
    return done


def run_one(task: dict, method: str, extra: list[str], seed: int, args, work: Path, lr: float,
            folder: str = "runs") -> dict:
    out = work / folder / task["name"] / (f"{method}-s{seed}" if folder == "runs" else f"{method}-lr{lr:g}")
    shutil.rmtree(out, ignore_errors=True)
    fill = {"seed": seed, "max_steps": args.max_steps, "eval_every": args.eval_every}
    argv = [a.format(**fill) for a in COMMON] + task["argv"] + extra + [
        "--output_dir", str(out), "--output_name", method, "--learning_rate", str(lr),
        "--surge_flavor_cache_dir", str(out / "flavors")]
    _quiet_accelerate()
    torch.manual_seed(seed)
    started = time.perf_counter()
    train(parse_train_args(argv))
    total = time.perf_counter() - started
    history = json.loads((out / "report" / "history.json").read_text())
    manifest = json.loads((out / "flavors" / "manifest.json").read_text())
    capture = float(manifest.get("capture_seconds", 0.0)) if uses_flavors(method) else 0.0
    shutil.rmtree(out / "flavors", ignore_errors=True)  # keep the disk small: only the records are needed
    for big in out.glob("*.safetensors"):
        big.unlink()
    return {"method": method, "seed": seed, "lr": lr, "eval": history["eval"], "capture_s": capture,
            "total_s": total}


def sweep_score(run: dict) -> float:
    """How a run did over its whole curve: the mean of log(held-out MSE) over its evaluations (lower is better;
    rewards getting low early as well as ending low). A diverged run (NaN/Inf) scores +inf."""
    values = [e["teacher_mse"] for e in run["eval"]]
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        return float("inf")
    return sum(math.log(v) for v in values) / len(values)


def sweep_lrs(task: dict, methods: dict[str, list[str]], grid: list[float], seed: int, args, work: Path
              ) -> tuple[dict[str, float], list[str]]:
    """Each method's best LR on the validation seed (not one of the reported seeds), and a table of the sweep."""
    best: dict[str, float] = {}
    lines = [f"\n### task {task['name']}: LR sweep on validation seed {seed} (score: mean log10 held-out MSE over "
             "the run; lower is better)", "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
             "|---|" + "---|" * (len(grid) + 1)]
    tried: dict[str, dict[float, float]] = {}
    for method, extra in methods.items():
        scores: dict[float, float] = {}

        def score(lr: float, method: str = method, extra: list[str] = extra, scores: dict = scores) -> None:
            run = run_one(task, method, extra, seed, args, work, lr, folder="sweep")
            scores[lr] = sweep_score(run)
            print(f"[{task['name']}] sweep {method} lr {lr:g}: score {scores[lr]:.4f}", flush=True)

        for lr in grid:
            score(lr)
        # A best LR at an edge of the grid is not a tuned LR: extend the grid on that side (×3 steps, twice at most).
        for _ in range(2):
            lrs = sorted(scores)
            chosen = min(lrs, key=lambda lr: scores[lr])
            if chosen == lrs[-1]:
                score(float(f"{chosen * 3:.3g}"))
            elif chosen == lrs[0]:
                score(float(f"{chosen / 3:.3g}"))
            else:
                break
        best[method] = min(scores, key=lambda lr: scores[lr])
        tried[method] = scores
    columns = sorted({lr for scores in tried.values() for lr in scores})
    lines = [lines[0], "| method | " + " | ".join(f"lr {lr:g}" for lr in columns) + " | chosen |",
             "|---|" + "---|" * (len(columns) + 1)]
    for method, scores in tried.items():
        cells = " | ".join("-" if lr not in scores else "diverged" if scores[lr] == float("inf")
                           else f"{scores[lr] / math.log(10):.3f}" for lr in columns)
        lines.append(f"| {method} | {cells} | {best[method]:g} |")
    return best, lines


def uses_flavors(method: str) -> bool:
    """Surge and its ablations need the teacher's flavor cache; the KD baselines only need live teacher calls
    (the trainer builds the cache for every run to get its held-out probes, but only surge is charged for it)."""
    return method.startswith("surge")


def reached(run: dict, threshold: float) -> tuple[int | None, float | None]:
    for entry in run["eval"]:
        if entry["teacher_mse"] <= threshold:
            return entry["step"], entry["seconds"] + run["capture_s"]
    return None, None


def summarize(runs: list[dict], task: str, target: float, max_steps: int) -> list[str]:
    """One markdown table: per method, how many runs reached the threshold and the medians to get there.

    A run that never reaches it counts as infinitely slow, so a median is finite only when most runs got
    there. When adamw_kd's median is not reached, the ratios are lower bounds (">"): its steps are taken as
    `max_steps` and its wall time as the time of its last evaluation."""
    inf = float("inf")
    start = statistics.median(r["eval"][0]["teacher_mse"] for r in runs)
    threshold = target * start
    lines = [f"\n## task {task}: start MSE {start:.5f}, threshold {threshold:.5f} ({target:.0%} of start)",
             "| method | reached | median steps | median wall s | steps vs adamw_kd | "
             "wall vs adamw_kd | final MSE (median) |", "|---|---|---|---|---|---|---|"]
    table: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        hits = [reached(r, threshold) for r in mine]
        table[method] = {"n": len(mine), "hit": sum(h[0] is not None for h in hits),
                         "steps": statistics.median(inf if h[0] is None else h[0] for h in hits),
                         "secs": statistics.median(inf if h[1] is None else h[1] for h in hits),
                         "last_secs": statistics.median(r["eval"][-1]["seconds"] + r["capture_s"] for r in mine),
                         "final": statistics.median(r["eval"][-1]["teacher_mse"] for r in mine)}
    baselines = [table[m] for m in BASELINES if m in table]
    # the best-tuned baseline, per column: the fewest median steps, and (separately) the least median wall time
    best = {key: min(baselines, key=lambda row: (row[key], row["last_secs"])) for key in ("steps", "secs")} \
        if baselines else {}

    def ratio(key: str, row: dict, bound: float) -> str:
        base = best.get(key)
        if base is None or row[key] == inf:
            return "-"
        if base[key] == inf:
            return f">{bound / row[key]:.2f}x"
        return f"{base[key] / row[key]:.2f}x"

    names = {key: next((m for m in BASELINES if table.get(m) is best.get(key)), "-") for key in ("steps", "secs")}
    lines[1] = (f"| method | lr | reached | median steps | median wall s | steps vs best baseline ({names['steps']}) | "
                f"wall vs best baseline ({names['secs']}) | final MSE (median) |")
    lines[2] = "|---|---|---|---|---|---|---|---|"
    for method, row in table.items():
        steps = f"{row['steps']:.0f}" if row["steps"] != inf else f">{max_steps}"
        secs = f"{row['secs']:.1f}" if row["secs"] != inf else "-"
        lr = statistics.median(r.get("lr", float("nan")) for r in runs if r["method"] == method)
        lines.append(f"| {method} | {lr:g} | {row['hit']}/{row['n']} | {steps} | {secs} | "
                     f"{ratio('steps', row, max_steps)} | "
                     f"{ratio('secs', row, best['secs']['last_secs'] if best else 0)} | {row['final']:.5f} |")
    return lines


def load_run(folder: Path) -> dict | None:
    """A finished run's record from its folder (None if it did not finish)."""
    history, manifest = folder / "report" / "history.json", folder / "flavors" / "manifest.json"
    if not history.is_file():
        return None
    method, _, seed = folder.name.rpartition("-s")
    capture = json.loads(manifest.read_text()).get("capture_seconds", 0.0) \
        if manifest.is_file() and uses_flavors(method) else 0.0
    return {"method": method, "seed": int(seed), "eval": json.loads(history.read_text())["eval"],
            "capture_s": float(capture), "total_s": float("nan")}


def summarize_all(runs: list[dict], task: str, targets: list[float], max_steps: int) -> list[str]:
    return [line for target in targets for line in summarize(runs, task, target, max_steps)]


def summarize_folder(work: Path, targets: list[float], max_steps: int) -> list[str]:
    lines = []
    for task_dir in sorted(p for p in (work / "runs").iterdir() if p.is_dir()):
        runs = [r for r in (load_run(d) for d in sorted(task_dir.iterdir())) if r is not None]
        order = list(METHODS) + list(ABLATIONS)
        runs.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else 99, r["seed"]))
        seeds = sorted({r["seed"] for r in runs})
        lines.append(f"\n(task {task_dir.name}: seeds {seeds})")
        lines += summarize_all(runs, task_dir.name, targets, max_steps)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--eval_every", type=int, default=5)
    parser.add_argument("--lr_grid", default="3e-4,1e-3,3e-3",
                        help="LRs swept for every method on the validation seed; each then runs at its own best")
    parser.add_argument("--validation_seed", type=int, default=100, help="the seed the LR sweep is scored on")
    parser.add_argument("--lr", type=float, default=0.0, help="skip the sweep: one LR for every method")
    parser.add_argument("--target", default="0.5,0.3,0.2",
                        help="thresholds as fractions of the start MSE, comma-separated (one table each)")
    parser.add_argument("--tasks", default="q,a,a_large,b",
                        help="q: the README's quickstart (tiny base → tiny teacher); a: LoRA teacher; "
                             "a_large: task a on the larger config; b: BK-SDM-Small pruned student")
    parser.add_argument("--methods", default="surge,surge_adamw,adamw_kd,adafactor_kd,bksdm")
    parser.add_argument("--ablations", default="", help=f"comma-separated, of: {', '.join(ABLATIONS)}")
    parser.add_argument("--work", default="bench/out/surge")
    parser.add_argument("--lora_steps", type=int, default=100)
    parser.add_argument("--large_base_steps", type=int, default=150, help="pre-training steps of the larger base")
    parser.add_argument("--repeats", type=int, default=3,
                        help="num_repeats for every dataset subset (0: the kit's own, 10 and 5); sets the epoch "
                             "length, and so how often surge re-measures the student and moves its LRs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: up to 2)")
    parser.add_argument("--summarize_only", action="store_true",
                        help="rebuild the tables from the finished runs under --work (e.g. after stopping early)")
    parser.add_argument("--from_json", nargs="*", default=[],
                        help="rebuild the tables (with --target) from runs-*.json files written by earlier runs")
    args = parser.parse_args()
    targets = [float(t) for t in args.target.split(",") if t]
    if args.from_json:
        for path in args.from_json:
            for task, runs in json.loads(Path(path).read_text()).items():
                print("\n".join(summarize_all(runs, task, targets, args.max_steps)))
        return
    if args.summarize_only:
        print("\n".join(summarize_folder(Path(args.work), targets, args.max_steps)))
        return
    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))

    from sd_scripts_surge.tiny.kit import ensure_tiny_kit

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    kit = ensure_tiny_kit()
    data = ["--dataset_config", str(dataset_with_repeats(kit.dataset_toml, work, args.repeats))]
    tasks = []
    wanted = args.tasks.split(",")
    if "q" in wanted:
        tasks.append({"name": "q_quickstart", "argv": ["--pretrained_model_name_or_path", str(kit.base_dir),
                                                        "--teacher_model", str(kit.teacher_dir)] + data})
    if "a" in wanted:
        lora = train_lora_teacher(kit, work, args.lora_steps)
        tasks.append({"name": "a_lora_teacher", "argv": ["--pretrained_model_name_or_path", str(kit.base_dir),
                                                          "--teacher_lora", f"{lora}:1.0"] + data})
    if "b" in wanted:
        pruned = make_pruned_student(kit, work)
        tasks.append({"name": "b_bk_small_student", "argv": ["--pretrained_model_name_or_path", str(pruned),
                                                            "--teacher_model", str(kit.teacher_dir)] + data})
    if "a_large" in wanted:
        large = make_large_base(kit, work, args.large_base_steps)
        lora = train_lora_teacher(kit, work, args.lora_steps, base=large, name="teacher_lora_large")
        tasks.append({"name": "a_large_lora_teacher", "argv": ["--pretrained_model_name_or_path", str(large),
                                                                "--teacher_lora", f"{lora}:1.0"] + data})
    chosen = {m: METHODS[m] for m in args.methods.split(",") if m}
    chosen |= {m: ABLATIONS[m] for m in args.ablations.split(",") if m}
    grid = [float(x) for x in args.lr_grid.split(",") if x]
    report = [f"# surge benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores, "
              f"torch {torch.__version__}, {args.seeds} seeds, ≤{args.max_steps} steps, "
              + (f"lr {args.lr:g} for all)" if args.lr
                 else f"LR per method from {grid} on seed {args.validation_seed})")]
    all_runs = {}
    for task in tasks:
        swept = {m: e for m, e in chosen.items() if m in METHODS}
        missing = {parent_method(m) for m in chosen} - set(swept)
        if missing and not args.lr:
            raise SystemExit(f"ablations take the swept LR of {sorted(missing)}: add it to --methods, or give --lr")
        if args.lr:
            best = {parent_method(m): args.lr for m in chosen}
        else:
            best, sweep_lines = sweep_lrs(task, swept, grid, args.validation_seed, args, work)
            report += sweep_lines
            print("\n".join(sweep_lines), flush=True)
        runs = []
        for seed in range(args.seeds):
            for method, extra in chosen.items():
                run = run_one(task, method, extra, seed, args, work, best.get(parent_method(method), args.lr))
                runs.append(run)
                print(f"[{task['name']}] {method} seed {seed}: start {run['eval'][0]['teacher_mse']:.5f} "
                      f"end {run['eval'][-1]['teacher_mse']:.5f} in {run['total_s']:.1f} s", flush=True)
        all_runs[task["name"]] = runs
        report += summarize_all(runs, task["name"], targets, args.max_steps)
        print("\n".join(report), flush=True)
    suffix = "-".join(wanted)
    (work / f"runs-{suffix}.json").write_text(json.dumps(all_runs, indent=1))
    (work / f"report-{suffix}.md").write_text("\n".join(report) + "\n")
    print(f"\nwrote {work / f'report-{suffix}.md'}")


if __name__ == "__main__":
    main()
