"""A small gradio front end: write a training TOML and run it, or run a merge, from a browser tab.

The GUI only builds command lines and TOML files; the work is done by the same CLIs a user would type
(`train_surge_sdxl.py`, `python -m merge_tools`), run as subprocesses whose output streams into the page.
It binds to 127.0.0.1 and shares nothing unless `--listen` / `--share` are given.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import toml

from merge_tools import methods as merge_methods

REPO_ROOT = Path(__file__).resolve().parent.parent

OPTIMIZERS = ["ADA_SURGE", "AdamW", "AdamW8bit", "Adafactor", "SGD"]
SCHEDULERS = ["cascade", "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial", "adafactor"]
MERGE_METHODS = list(merge_methods.REGISTRY)  # the merge registry, in registration order


def build_train_config(
    pretrained: str,
    teacher: str,
    dataset_config: str,
    output_dir: str,
    output_name: str,
    optimizer_type: str,
    lr_scheduler: str,
    learning_rate: float,
    max_train_epochs: int,
    train_batch_size: int,
    surge: bool,
    shock_rate: float,
    smooth_rate: float,
    network_dim: int,
) -> dict:
    """The kohya-style TOML (as a dict) for the values in the Train tab. network_dim 0 = full fine-tune."""
    config: dict = {
        "model": {"pretrained_model_name_or_path": pretrained},
        "dataset": {"dataset_config": dataset_config},
        "output": {"output_dir": output_dir, "output_name": output_name, "save_model_as": "safetensors"},
        "training": {
            "optimizer_type": optimizer_type,
            "lr_scheduler": lr_scheduler,
            "learning_rate": float(learning_rate),
            "max_train_epochs": int(max_train_epochs),
            "train_batch_size": int(train_batch_size),
            "surge": bool(surge),
        },
        "surge": {"shock_rate": float(shock_rate), "smooth_rate": float(smooth_rate)},
    }
    if teacher:
        config["model"]["teacher_model"] = teacher
    if network_dim > 0:
        config["network"] = {"network_module": "networks.lora", "network_dim": int(network_dim),
                             "network_alpha": float(network_dim) / 2}
    return config


def train_command(config_path: str | Path, num_processes: int = 1) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1:
        command.append("--multi_gpu")
    return command + [str(REPO_ROOT / "train_surge_sdxl.py"), "--config_file", str(config_path)]


def merge_command(method: str, base: str, models: str, output: str, extra: str = "") -> list[str]:
    """`python -m merge_tools METHOD [--base B] M1 M2 ... -o OUT [extra flags]`; models: one path per line."""
    paths = [line.strip() for line in models.splitlines() if line.strip()]
    if not paths:
        raise ValueError("give at least one model path (one per line)")
    if not output:
        raise ValueError("give an output path")
    command = [sys.executable, "-m", "merge_tools", method]
    if base:
        command += ["--base", base]
    return command + paths + ["-o", output] + shlex.split(extra)


def stream_command(command: list[str]) -> Iterator[str]:
    """Run `command`, yielding the accumulated log after every line (gradio streams generator output)."""
    log = "$ " + shlex.join(command) + "\n"
    yield log
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    assert process.stdout is not None
    for line in process.stdout:
        log += line
        yield log
    code = process.wait()
    yield log + f"\n[exit code {code}]\n"


def build_app():  # -> gradio.Blocks (gradio is imported lazily: the trainer does not need it)
    import gradio as gr

    def write_and_train(config_path: str, num_processes: int, *values):
        config = build_train_config(*values)
        path = Path(config_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(toml.dumps(config))
        yield from stream_command(train_command(path, int(num_processes)))

    def run_merge(method: str, base: str, models: str, output: str, extra: str):
        try:
            command = merge_command(method, base, models, output, extra)
        except ValueError as e:
            yield f"error: {e}"
            return
        yield from stream_command(command)

    with gr.Blocks(title="sd-scripts-surge") as app:
        gr.Markdown("# sd-scripts-surge\nSurge training and FP64 merges. Commands run on this machine.")
        with gr.Tab("Train"):
            with gr.Row():
                pretrained = gr.Textbox(label="pretrained_model_name_or_path", value="tiny:base")
                teacher = gr.Textbox(label="teacher_model", value="tiny:teacher")
                dataset = gr.Textbox(label="dataset_config", value="tiny:dataset")
            with gr.Row():
                output_dir = gr.Textbox(label="output_dir", value="output/gui")
                output_name = gr.Textbox(label="output_name", value="surge")
                config_path = gr.Textbox(label="write config to", value="output/gui/config.toml")
            with gr.Row():
                optimizer = gr.Dropdown(OPTIMIZERS, value="ADA_SURGE", label="optimizer_type")
                scheduler = gr.Dropdown(SCHEDULERS, value="cascade", label="lr_scheduler")
                lr = gr.Number(label="learning_rate", value=1e-3)
                epochs = gr.Number(label="max_train_epochs", value=4, precision=0)
                batch = gr.Number(label="train_batch_size", value=4, precision=0)
            with gr.Row():
                surge = gr.Checkbox(label="surge (off = plain kohya-style fine-tune)", value=True)
                shock = gr.Number(label="shock_rate", value=5)
                smooth = gr.Number(label="smooth_rate", value=0.5641895835)
                dim = gr.Number(label="network_dim (0 = full fine-tune)", value=0, precision=0)
                procs = gr.Number(label="processes", value=1, precision=0)
            train_log = gr.Textbox(label="log", lines=20)
            gr.Button("Write config and train").click(
                write_and_train,
                [config_path, procs, pretrained, teacher, dataset, output_dir, output_name, optimizer, scheduler,
                 lr, epochs, batch, surge, shock, smooth, dim],
                train_log,
            )
        with gr.Tab("Merge"):
            with gr.Row():
                method = gr.Dropdown(MERGE_METHODS, value="ties", label="method")
                base = gr.Textbox(label="base (for delta methods)")
                output = gr.Textbox(label="output", value="output/merged.safetensors")
            models = gr.Textbox(label="models (one path per line)", lines=5)
            extra = gr.Textbox(label="extra flags", value="--k 0.2 --dtype fp16")
            merge_log = gr.Textbox(label="log", lines=20)
            gr.Button("Merge").click(run_merge, [method, base, models, output, extra], merge_log)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sd-scripts-surge GUI")
    parser.add_argument("--listen", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio link (off by default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    build_app().queue().launch(server_name=args.listen, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
