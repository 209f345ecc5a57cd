"""Benchmark (not a test): does surge reach a teacher-matching target in fewer steps and less wall time?

Side by side in one run, on the tiny kit, same student, teacher, data and held-out probes for every method:

  surge          ADA_SURGE + Cascade + per-unit LR controller + unit replay + trajectory loss
  adamw_kd       AdamW, task + output KD (what people do today with kohya + a teacher)
  adafactor_kd   Adafactor (kohya's recommended fixed-LR settings), task + output KD
  bksdm          AdamW, task + output KD + feature KD on every unit, equal weights (BK-SDM)
  ablations      surge_random_lr (random per-unit LRs), surge_no_replay, surge_no_cascade

Tasks: (a) student = base, teacher = base + a LoRA trained on the data (hooked, never merged);
       (b) pruned student (no mid block, BK-SDM-Base style, other weights from the teacher) vs full teacher.
Metric: held-out noise-prediction MSE between student and teacher on fixed probes, measured every
`--eval_every` steps; threshold = `--target` × the starting MSE. Reported per method: steps and wall
seconds to the threshold (teacher capture included for surge), median over seeds, and the ratio to
adamw_kd. Runs that never reach the threshold count as not reached (shown as ">max").

    python bench/bench_surge.py --seeds 5 --max_steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sd_scripts_surge.config import parse_train_args  # noqa: E402
from sd_scripts_surge.train import train  # noqa: E402

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
ABLATIONS: dict[str, list[str]] = {
    "surge_random_lr": METHODS["surge"] + ["--surge_random_lr", "true"],
    "surge_no_replay": METHODS["surge"] + ["--surge_replay_units", "0"],
    "surge_no_cascade": [a if a != "cascade" else "cosine_with_restarts" for a in METHODS["surge"]],
}


def _quiet_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def train_lora_teacher(kit, work: Path, steps: int) -> Path:
    """Task (a)'s teacher: a LoRA trained on the data by our own trainer (plain fine-tune, no teacher)."""
    out = work / "teacher_lora"
    path = out / "teacher_lora.safetensors"
    if path.exists():
        return path
    argv = ["--pretrained_model_name_or_path", str(kit.base_dir), "--dataset_config", str(kit.dataset_toml),
            "--output_dir", str(out), "--output_name", "teacher_lora", "--surge", "false",
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
            "--optimizer_type", "AdamW", "--learning_rate", "5e-3", "--max_train_steps", str(steps),
            "--train_batch_size", "4", "--seed", "7"]
    _quiet_accelerate()
    train(parse_train_args(argv))
    return path


def make_pruned_student(kit, work: Path) -> Path:
    """Task (b)'s student: the teacher without its mid block (BK-SDM-Base), other weights copied."""
    from diffusers import UNet2DConditionModel

    folder = work / "pruned_student"
    if (folder / "unet" / "config.json").exists():
        return folder
    shutil.copytree(kit.teacher_dir, folder, dirs_exist_ok=True)
    teacher = UNet2DConditionModel.from_pretrained(kit.teacher_dir, subfolder="unet")
    config = dict(teacher.config)
    config["mid_block_type"] = None
    pruned = UNet2DConditionModel.from_config(config)
    missing = pruned.load_state_dict({k: v for k, v in teacher.state_dict().items()
                                      if not k.startswith("mid_block.")}, strict=True)
    assert not missing.missing_keys
    shutil.rmtree(folder / "unet")
    pruned.save_pretrained(folder / "unet")
    return folder


def run_one(task: dict, method: str, extra: list[str], seed: int, args, work: Path) -> dict:
    out = work / "runs" / task["name"] / f"{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    fill = {"seed": seed, "max_steps": args.max_steps, "eval_every": args.eval_every}
    argv = [a.format(**fill) for a in COMMON] + task["argv"] + extra + [
        "--output_dir", str(out), "--output_name", method, "--learning_rate", str(args.lr),
        "--surge_flavor_cache_dir", str(out / "flavors")]
    _quiet_accelerate()
    torch.manual_seed(seed)
    started = time.perf_counter()
    train(parse_train_args(argv))
    total = time.perf_counter() - started
    history = json.loads((out / "report" / "history.json").read_text())
    manifest = json.loads((out / "flavors" / "manifest.json").read_text())
    capture = float(manifest.get("capture_seconds", 0.0))
    return {"method": method, "seed": seed, "eval": history["eval"], "capture_s": capture, "total_s": total}


def reached(run: dict, threshold: float) -> tuple[int | None, float | None]:
    for entry in run["eval"]:
        if entry["teacher_mse"] <= threshold:
            return entry["step"], entry["seconds"] + run["capture_s"]
    return None, None


def summarize(runs: list[dict], task: str, target: float, max_steps: int) -> list[str]:
    start = statistics.median(r["eval"][0]["teacher_mse"] for r in runs)
    threshold = target * start
    lines = [f"\n## task {task}: start MSE {start:.5f}, threshold {threshold:.5f} ({target:.0%} of start)",
             "| method | reached | median steps | median wall s (capture incl.) | steps vs adamw_kd | "
             "wall vs adamw_kd | final MSE (median) |", "|---|---|---|---|---|---|---|"]
    table: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        hits = [reached(r, threshold) for r in mine]
        steps = [h[0] if h[0] is not None else max_steps * 2 for h in hits]  # not reached: counted as 2× max
        secs = [h[1] if h[1] is not None else float("inf") for h in hits]
        table[method] = {"n": len(mine), "hit": sum(h[0] is not None for h in hits),
                         "steps": statistics.median(steps), "secs": statistics.median(secs),
                         "final": statistics.median(r["eval"][-1]["teacher_mse"] for r in mine)}
    base = table.get("adamw_kd")
    for method, row in table.items():
        steps = f"{row['steps']:.0f}" if row["steps"] <= max_steps else f">{max_steps}"
        secs = f"{row['secs']:.1f}" if row["secs"] != float("inf") else "-"
        ratio_steps = f"{base['steps'] / row['steps']:.2f}x" if base and row["steps"] <= max_steps else "-"
        ratio_secs = f"{base['secs'] / row['secs']:.2f}x" if base and row["secs"] != float("inf") \
            and base["secs"] != float("inf") else "-"
        lines.append(f"| {method} | {row['hit']}/{row['n']} | {steps} | {secs} | {ratio_steps} | {ratio_secs} | "
                     f"{row['final']:.5f} |")
    return lines


def load_run(folder: Path) -> dict | None:
    """A finished run's record from its folder (None if it did not finish)."""
    history, manifest = folder / "report" / "history.json", folder / "flavors" / "manifest.json"
    if not history.is_file():
        return None
    method, _, seed = folder.name.rpartition("-s")
    capture = json.loads(manifest.read_text()).get("capture_seconds", 0.0) if manifest.is_file() else 0.0
    return {"method": method, "seed": int(seed), "eval": json.loads(history.read_text())["eval"],
            "capture_s": float(capture), "total_s": float("nan")}


def summarize_folder(work: Path, target: float, max_steps: int) -> list[str]:
    lines = []
    for task_dir in sorted(p for p in (work / "runs").iterdir() if p.is_dir()):
        runs = [r for r in (load_run(d) for d in sorted(task_dir.iterdir())) if r is not None]
        order = list(METHODS) + list(ABLATIONS)
        runs.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else 99, r["seed"]))
        seeds = sorted({r["seed"] for r in runs})
        lines.append(f"\n(task {task_dir.name}: seeds {seeds})")
        lines += summarize(runs, task_dir.name, target, max_steps)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--target", type=float, default=0.6, help="threshold as a fraction of the start MSE")
    parser.add_argument("--tasks", default="a,b")
    parser.add_argument("--methods", default="surge,adamw_kd,adafactor_kd,bksdm")
    parser.add_argument("--ablations", default="surge_random_lr,surge_no_replay,surge_no_cascade")
    parser.add_argument("--work", default="bench/out/surge")
    parser.add_argument("--lora_steps", type=int, default=100)
    parser.add_argument("--summarize_only", action="store_true",
                        help="rebuild the tables from the finished runs under --work (e.g. after stopping early)")
    args = parser.parse_args()
    if args.summarize_only:
        print("\n".join(summarize_folder(Path(args.work), args.target, args.max_steps)))
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    from sd_scripts_surge.tiny.kit import ensure_tiny_kit

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    kit = ensure_tiny_kit()
    data = ["--dataset_config", str(kit.dataset_toml)]
    tasks = []
    if "a" in args.tasks.split(","):
        lora = train_lora_teacher(kit, work, args.lora_steps)
        tasks.append({"name": "a_lora_teacher", "argv": ["--pretrained_model_name_or_path", str(kit.base_dir),
                                                          "--teacher_lora", f"{lora}:1.0"] + data})
    if "b" in args.tasks.split(","):
        pruned = make_pruned_student(kit, work)
        tasks.append({"name": "b_pruned_student", "argv": ["--pretrained_model_name_or_path", str(pruned),
                                                            "--teacher_model", str(kit.teacher_dir)] + data})
    chosen = {m: METHODS[m] for m in args.methods.split(",") if m}
    chosen |= {m: ABLATIONS[m] for m in args.ablations.split(",") if m}
    report = [f"# surge benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores, "
              f"torch {torch.__version__}, {args.seeds} seeds, ≤{args.max_steps} steps, lr {args.lr})"]
    all_runs = {}
    for task in tasks:
        runs = []
        for seed in range(args.seeds):
            for method, extra in chosen.items():
                run = run_one(task, method, extra, seed, args, work)
                runs.append(run)
                print(f"[{task['name']}] {method} seed {seed}: start {run['eval'][0]['teacher_mse']:.5f} "
                      f"end {run['eval'][-1]['teacher_mse']:.5f} in {run['total_s']:.1f} s", flush=True)
        all_runs[task["name"]] = runs
        report += summarize(runs, task["name"], args.target, args.max_steps)
        print("\n".join(report), flush=True)
    (work / "runs.json").write_text(json.dumps(all_runs, indent=1))
    (work / "report.md").write_text("\n".join(report) + "\n")
    print(f"\nwrote {work / 'report.md'}")


if __name__ == "__main__":
    main()
