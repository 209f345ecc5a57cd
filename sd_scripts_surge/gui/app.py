"""`sd-surge-gui`: a gradio app with Train, Merge and Inspect tabs, bound to 127.0.0.1 unless asked.

The app only writes files and command lines; the work is done by the same commands a user would type
(`accelerate launch train_surge_sdxl.py --config_file …`, `python -m merge_tools recipe …`), run as
subprocesses whose log and progress stream into the page. Every form is built from the single sources:
the trainer's argument parser (defaults, choices, one-line help), the optimizer/scheduler registries, the
merge registry (each method's own typed parameters) and the MBW block table of the detected architecture.
Errors appear in the page, never as tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import toml

from merge_tools import methods as merge_methods
from sd_scripts_surge.config import ConfigError, build_parser, parse_bool, read_config_file, write_config_file
from sd_scripts_surge.gui.runner import Job, progress_html
from sd_scripts_surge.models.fileio import CheckpointError, read_safetensors_header
from sd_scripts_surge.models.keymap import PRESETS, detect_architecture, preset_weights
from sd_scripts_surge.training.optim_registry import OPTIMIZER_NAMES, SCHEDULER_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
MERGE_METHODS = list(merge_methods.REGISTRY)  # the merge registry, in registration order
MAX_BLOCKS = 26  # SD1's 26 MBW blocks; SDXL uses the first 20 sliders

# The Train tab's fields, in kohya_ss's order; each is a trainer flag (its dest name).
TRAIN_SECTIONS: dict[str, list[str]] = {
    "Model": ["pretrained_model_name_or_path", "teacher_model", "teacher_lora", "tokenizer_dir"],
    "Dataset": ["dataset_config", "train_data_dir", "resolution", "caption_extension"],
    "Output": ["output_dir", "output_name", "save_model_as", "save_precision", "save_every_n_epochs", "save_state"],
    "Optimizer and schedule": ["optimizer_type", "optimizer_args", "learning_rate", "lr_scheduler",
                               "lr_warmup_steps", "lr_scheduler_num_cycles", "max_train_epochs", "max_train_steps",
                               "train_batch_size", "gradient_accumulation_steps", "mixed_precision",
                               "gradient_checkpointing", "seed"],
    "Surge": ["surge", "surge_shock_rate", "surge_smooth_rate", "surge_max_hops", "surge_anchor_grasp",
              "surge_num_seeds", "surge_lr_rule", "surge_keep_mean_lr", "surge_replay_mode", "surge_replay_steps",
              "surge_teacher", "surge_traj_weight", "surge_w_task", "surge_w_out", "surge_unit_map"],
    "LoRA": ["network_module", "network_dim", "network_alpha", "network_args"],
}
# What a new run starts from: the README's tiny task (no downloads), as examples/quickstart.toml.
TRAIN_DEFAULTS = {"pretrained_model_name_or_path": "tiny:base", "teacher_model": "tiny:teacher",
                  "dataset_config": "tiny:dataset", "output_dir": "output/gui", "output_name": "surge",
                  "max_train_epochs": 2, "train_batch_size": 4, "optimizer_type": "ADA_SURGE",
                  "lr_scheduler": "cascade", "learning_rate": 1e-3}


class FormError(ValueError):
    """A value in the page that cannot be used; shown in the page."""


# ------------------------------------------------------------------------------------------ Train tab


def train_fields() -> list[tuple[str, argparse.Action]]:
    """(section, parser action) of every Train tab field."""
    actions = {a.dest: a for a in build_parser()._actions}
    missing = [k for keys in TRAIN_SECTIONS.values() for k in keys if k not in actions]
    if missing:
        raise RuntimeError(f"GUI fields without a trainer flag: {missing}")
    return [(section, actions[k]) for section, keys in TRAIN_SECTIONS.items() for k in keys]


def field_kind(action: argparse.Action) -> str:
    if action.dest in ("optimizer_type", "lr_scheduler") or action.choices:
        return "choice"
    if isinstance(action, argparse._StoreTrueAction) or action.type is parse_bool:
        return "bool"
    if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
        return "list"
    if action.type in (int, float):
        return action.type.__name__
    return "text"


def field_choices(action: argparse.Action) -> list[str]:
    if action.dest == "optimizer_type":
        return list(OPTIMIZER_NAMES)
    if action.dest == "lr_scheduler":
        return list(SCHEDULER_NAMES)
    return [str(c) for c in action.choices or []]


def field_help(action: argparse.Action) -> str:
    text = action.help if action.help and action.help != argparse.SUPPRESS else ""
    return str(text or "").replace("%%", "%")


def form_values(fields: Sequence[tuple[str, argparse.Action]], raw: Sequence[Any]) -> dict[str, Any]:
    """Trainer arguments (dest → value) from the page's values; empty fields are left out."""
    values: dict[str, Any] = {}
    for (_, action), value in zip(fields, raw):
        kind = field_kind(action)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if kind == "list":
            items = [line.strip() for line in str(value).splitlines() if line.strip()]
            if items:
                values[action.dest] = items
        elif kind == "int":
            if float(value) != int(float(value)):
                raise FormError(f"{action.dest} must be a whole number, not {value}")
            values[action.dest] = int(float(value))
        elif kind == "float":
            values[action.dest] = float(value)
        elif kind == "bool":
            values[action.dest] = bool(value)
        else:
            values[action.dest] = str(value).strip()
    return values


def validate_train_values(values: dict[str, Any]) -> None:
    """Paths must exist (tiny: names are built by the kit); a clear message otherwise."""
    for key in ("pretrained_model_name_or_path", "teacher_model", "dataset_config", "train_data_dir", "tokenizer_dir"):
        value = values.get(key)
        if value and not str(value).startswith("tiny:") and not Path(value).expanduser().exists():
            raise FormError(f"{key}: {value} does not exist")
    for item in values.get("teacher_lora", []):
        path = item.rsplit(":", 1)[0] if ":" in item and not Path(item).exists() else item
        if not Path(path).expanduser().exists():
            raise FormError(f"teacher_lora: {path} does not exist")
    if not values.get("dataset_config") and not values.get("train_data_dir"):
        raise FormError("give a dataset_config (kohya dataset TOML) or a train_data_dir")


def train_command(config_path: str | Path, num_processes: int = 1) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1:
        command.append("--multi_gpu")
    return command + [str(REPO_ROOT / "train_surge_sdxl.py"), "--config_file", str(config_path)]


def load_kohya_toml(path: str, fields: Sequence[tuple[str, argparse.Action]]) -> list[Any]:
    """Field values from an existing kohya_ss / sd-scripts TOML (unknown keys: the trainer's own error)."""
    values, _ = read_config_file(path)
    out = []
    for _, action in fields:
        value = values.get(action.dest, action.default)
        if field_kind(action) == "list":
            value = "\n".join(str(v) for v in (value if isinstance(value, list) else [value] if value else []))
        out.append(value)
    return out


# ------------------------------------------------------------------------------------------ Merge tab


def method_params() -> list[tuple[str, str, merge_methods.Param]]:
    """(method, parameter, Param) for every method parameter, registry order: one field each."""
    return [(m, n, p) for m, spec in merge_methods.REGISTRY.items() for n, p in spec.params.items()]


def detect_blocks(model_path: str) -> tuple[str, tuple[str, ...]]:
    header = read_safetensors_header(Path(model_path).expanduser())
    arch = detect_architecture({k: v.shape for k, v in header.tensors.items()})
    return arch.name, arch.blocks


def build_merge_recipe(
    method: str, base: str, models_text: str, params: dict[str, Any], mbw: dict[str, float] | None,
    dtype: str = "fp16",
) -> dict[str, Any]:
    """The TOML recipe (as a dict) the Merge tab runs; paths checked, parameters checked by the registry."""
    spec = merge_methods.get(method)
    paths = [line.strip() for line in models_text.splitlines() if line.strip()]
    if not paths:
        raise FormError("give at least one model path (one per line)")
    inputs = ([base.strip()] if spec.inputs == "base+models" else []) + paths
    if spec.inputs == "base+models" and not base.strip():
        raise FormError(f"{method} needs a base model")
    for p in inputs:
        if not Path(p).expanduser().is_file():
            raise FormError(f"model not found: {p}")
    names = (["base"] if spec.inputs == "base+models" else []) + [f"m{i}" for i in range(len(paths))]
    node: dict[str, Any] = {"method": method, "inputs": names}
    node.update({k: v for k, v in params.items() if v is not None})
    if mbw is not None:
        if not spec.strength:
            raise FormError(f"{method} has no block-weighted parameter; turn MBW off")
        node[spec.strength] = mbw
    try:
        spec.check_inputs(len(inputs))
        spec.resolve_params({k: v for k, v in node.items() if k not in ("method", "inputs")})
    except ValueError as e:
        raise FormError(str(e)) from e
    return {"models": dict(zip(names, [str(Path(p).expanduser().resolve()) for p in inputs])),
            "nodes": {"merge": node}, "output": {"dtype": dtype}}


# ---------------------------------------------------------------------------------------- Inspect tab


def inspect_folder(folder: str) -> tuple[list[tuple[Any, str]], str]:
    """Every figure (PNG) under a training output or a diagnostics folder, and its text summaries."""
    from PIL import Image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FormError(f"{folder} is not a folder")
    images = [(Image.open(p).convert("RGB"), str(p.relative_to(root))) for p in sorted(root.rglob("*.png"))[:60]]
    texts = []
    for p in sorted(root.rglob("*.json"))[:5] + sorted(root.rglob("report*.md"))[:2]:
        try:
            body = p.read_text(encoding="utf-8")
            if p.suffix == ".json":
                body = json.dumps(json.loads(body), indent=1)[:3000]
            texts.append(f"### {p.relative_to(root)}\n```\n{body[:3000]}\n```")
        except (OSError, ValueError):
            continue
    if not images and not texts:
        raise FormError(f"{folder} holds no report figures or summaries (PNG / JSON)")
    return images, "\n\n".join(texts) or "(no text summaries)"


# ---------------------------------------------------------------------------------------------- the app


def _error(message: str) -> str:
    return f"**error:** {message}"


def build_app():  # noqa: ANN201 - gradio.Blocks (gradio is imported lazily: the trainer does not need it)
    import gradio as gr

    fields = train_fields()
    train_job, merge_job = Job(), Job()
    params = method_params()

    with gr.Blocks(title="sd-scripts-surge") as app:
        gr.Markdown("# sd-scripts-surge\nSurge training, FP64 merges and their reports. Commands run on this "
                    "machine; the page only writes files and starts them.")
        with gr.Tab("Train"):
            components = []
            for section in TRAIN_SECTIONS:
                with gr.Accordion(section, open=section != "LoRA"):
                    for sec, action in fields:
                        if sec != section:
                            continue
                        kind = field_kind(action)
                        value = TRAIN_DEFAULTS.get(action.dest, action.default)
                        label, info = action.dest, field_help(action)
                        if kind == "choice":
                            c = gr.Dropdown(field_choices(action), value=value, label=label, info=info,
                                            allow_custom_value=action.dest == "optimizer_type",
                                            elem_id=f"train-{action.dest}")
                        elif kind == "bool":
                            c = gr.Checkbox(value=bool(value), label=label, info=info, elem_id=f"train-{action.dest}")
                        elif kind in ("int", "float"):
                            c = gr.Number(value=value, label=label, info=info, precision=0 if kind == "int" else None,
                                          elem_id=f"train-{action.dest}")
                        else:
                            text = "\n".join(value) if isinstance(value, list) else ("" if value is None else value)
                            c = gr.Textbox(value=str(text), label=label, info=info, lines=2 if kind == "list" else 1,
                                           elem_id=f"train-{action.dest}")
                        components.append(c)
            with gr.Row():
                config_path = gr.Textbox(label="write the TOML to", value="output/gui/config.toml",
                                         elem_id="train-config-path")
                processes = gr.Number(label="processes (accelerate --num_processes)", value=1, precision=0)
                load_path = gr.Textbox(label="load an existing kohya_ss / sd-scripts TOML", elem_id="train-load")
            with gr.Row():
                load_button = gr.Button("Load TOML")
                start_button = gr.Button("Write TOML and train", variant="primary", elem_id="train-start")
                stop_button = gr.Button("Stop (saves state)", elem_id="train-stop")
            train_error = gr.Markdown(elem_id="train-error")
            train_progress = gr.HTML(progress_html(None), elem_id="train-progress")
            toml_view = gr.Code(label="TOML", language="yaml", elem_id="train-toml")
            train_log = gr.Textbox(label="log", lines=16, max_lines=30, elem_id="train-log", autoscroll=True)

            def start_training(path: str, procs: float, *raw: Any) -> Iterator[tuple[str, str, str, str]]:
                try:
                    values = form_values(fields, raw)
                    validate_train_values(values)
                    written = write_config_file(values, path)
                except (FormError, ConfigError, OSError, ValueError) as e:
                    yield _error(str(e)), "", "", progress_html(None, "not started")
                    return
                text = written.read_text(encoding="utf-8")
                for log, progress in train_job.run(train_command(written, int(procs or 1)), REPO_ROOT,
                                                   done_label="training finished"):
                    yield "", text, log, progress

            def load(path: str) -> list[Any]:
                try:
                    return [*load_kohya_toml(path, fields), ""]
                except (ConfigError, OSError) as e:
                    return [gr.update() for _ in fields] + [_error(str(e))]

            start_button.click(start_training, [config_path, processes, *components],
                               [train_error, toml_view, train_log, train_progress])
            stop_button.click(lambda: train_job.stop(), None, train_error)
            load_button.click(load, load_path, [*components, train_error])

        with gr.Tab("Merge"):
            with gr.Row():
                method = gr.Dropdown(MERGE_METHODS, value="ties", label="method", elem_id="merge-method")
                dtype = gr.Dropdown(["fp16", "bf16", "fp32"], value="fp16", label="output dtype")
                output = gr.Textbox(label="output", value="output/merged.safetensors", elem_id="merge-output")
            summary = gr.Markdown(merge_methods.get("ties").summary, elem_id="merge-summary")
            base = gr.Textbox(label="base (θ_base of delta methods)", elem_id="merge-base")
            models = gr.Textbox(label="models (one path per line)", lines=4, elem_id="merge-models")
            param_boxes, groups = [], {}
            for name, spec in merge_methods.REGISTRY.items():
                with gr.Group(visible=name == "ties") as group:
                    for pname, p in spec.params.items():
                        info = f"{p.help} ({p.range_text})" if p.range_text else p.help
                        if p.kind == "bool":
                            c = gr.Checkbox(value=p.default, label=pname, info=info)
                        elif p.kind == "floats":
                            c = gr.Textbox(value="", label=pname, info=info + " — comma-separated")
                        else:
                            c = gr.Number(value=p.default, label=pname, info=info,
                                          precision=0 if p.kind == "int" else None,
                                          elem_id=f"merge-{name}-{pname}")
                        param_boxes.append(c)
                groups[name] = group
            with gr.Accordion("MBW block weights", open=False):
                with gr.Row():
                    use_mbw = gr.Checkbox(label="use block weights for the method's MBW parameter", value=False)
                    preset = gr.Dropdown(["(custom)", *PRESETS], value="(custom)", label="preset")
                    detect = gr.Button("Detect blocks from the first model")
                arch_info = gr.Markdown("blocks: detect them from a model")
                sliders = [gr.Slider(0, 1, value=0.5, step=0.01, label=f"block {i}", visible=False)
                           for i in range(MAX_BLOCKS)]
            with gr.Row():
                preview_button = gr.Button("Preview recipe")
                merge_button = gr.Button("Merge", variant="primary", elem_id="merge-start")
            merge_error = gr.Markdown(elem_id="merge-error")
            recipe_view = gr.Code(label="recipe (TOML)", language="yaml", elem_id="merge-recipe")
            merge_progress = gr.HTML(progress_html(None), elem_id="merge-progress")
            merge_log = gr.Textbox(label="log", lines=12, elem_id="merge-log", autoscroll=True)
            blocks_state = gr.State(())

            def on_method(name: str) -> list[Any]:
                return [merge_methods.get(name).summary, *[gr.update(visible=m == name) for m in groups]]

            method.change(on_method, method, [summary, *groups.values()])

            def on_detect(models_text: str) -> list[Any]:
                first = next((line.strip() for line in models_text.splitlines() if line.strip()), "")
                try:
                    arch, blocks = detect_blocks(first)
                except (CheckpointError, OSError, ValueError) as e:
                    return [_error(f"cannot read {first or 'a model'}: {e}"), (), *[gr.update() for _ in sliders]]
                if not blocks:
                    return [_error(f"{first}: unknown architecture, no MBW blocks"), (),
                            *[gr.update(visible=False) for _ in sliders]]
                ups = [gr.update(visible=i < len(blocks), label=blocks[i] if i < len(blocks) else "")
                       for i in range(MAX_BLOCKS)]
                return [f"{arch}: {len(blocks)} blocks", tuple(blocks), *ups]

            detect.click(on_detect, models, [arch_info, blocks_state, *sliders])

            def on_preset(name: str, blocks: tuple[str, ...]) -> list[Any]:
                if name == "(custom)" or not blocks:
                    return [gr.update() for _ in sliders]
                weights = preset_weights(name, len(blocks))
                return [gr.update(value=weights[i]) if i < len(blocks) else gr.update() for i in range(MAX_BLOCKS)]

            preset.change(on_preset, [preset, blocks_state], sliders)

            def recipe_from(name: str, base_path: str, models_text: str, dt: str, mbw_on: bool,
                            blocks: tuple[str, ...], *rest: Any) -> dict[str, Any]:
                values, weights = rest[: len(params)], rest[len(params) :]
                chosen: dict[str, Any] = {}
                for (m, pname, p), v in zip(params, values):
                    if m != name or v is None or v == "":
                        continue
                    chosen[pname] = [float(x) for x in str(v).split(",")] if p.kind == "floats" else v
                mbw = None
                if mbw_on:
                    if not blocks:
                        raise FormError("detect the blocks first (button in the MBW section)")
                    mbw = {b: float(w) for b, w in zip(blocks, weights)}
                return build_merge_recipe(name, base_path, models_text, chosen, mbw, dt)

            merge_inputs = [method, base, models, dtype, use_mbw, blocks_state, *param_boxes, *sliders]

            def preview(*args: Any) -> tuple[str, str]:
                try:
                    return "", toml.dumps(recipe_from(*args))
                except (FormError, ValueError, KeyError) as e:
                    return _error(str(e)), ""

            def run_merge(out: str, *args: Any) -> Iterator[tuple[str, str, str, str]]:
                try:
                    recipe = recipe_from(*args)
                    if not out.strip():
                        raise FormError("give an output path")
                    out_path = Path(out).expanduser()
                    if not out_path.is_absolute():
                        out_path = REPO_ROOT / out_path
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    recipe_path = out_path.with_suffix(".recipe.toml")
                    recipe_path.write_text(toml.dumps(recipe), encoding="utf-8")
                except (FormError, ValueError, KeyError, OSError) as e:
                    yield _error(str(e)), "", "", progress_html(None, "not started")
                    return
                command = [sys.executable, "-m", "merge_tools", "recipe", str(recipe_path), "-o", str(out_path)]
                for log, progress in merge_job.run(command, REPO_ROOT, done_label="merge finished"):
                    yield "", recipe_path.read_text(encoding="utf-8"), log, progress

            preview_button.click(preview, merge_inputs, [merge_error, recipe_view])
            merge_button.click(run_merge, [output, *merge_inputs], [merge_error, recipe_view, merge_log,
                                                                     merge_progress])

        with gr.Tab("Inspect"):
            gr.Markdown("Figures of a training output folder (per-unit LR heatmap, anchors, losses, samples) or "
                        "of `sd-merge inspect --out DIR` (similarity heatmaps, the model map).")
            with gr.Row():
                folder = gr.Textbox(label="folder", value="output/gui", elem_id="inspect-folder")
                inspect_models = gr.Textbox(label="or: models to compare (one per line) → writes the folder",
                                            lines=3, elem_id="inspect-models")
            with gr.Row():
                show = gr.Button("Show", variant="primary", elem_id="inspect-show")
                compare = gr.Button("Compare models (sd-merge inspect)", elem_id="inspect-compare")
            inspect_error = gr.Markdown(elem_id="inspect-error")
            gallery = gr.Gallery(label="figures", columns=3, elem_id="inspect-gallery")
            texts = gr.Markdown(elem_id="inspect-text")
            inspect_log = gr.Textbox(label="log", lines=6)

            def on_show(path: str) -> tuple[str, Any, str]:
                try:
                    images, text = inspect_folder(path)
                except FormError as e:
                    return _error(str(e)), [], ""
                return "", images, text

            def on_compare(path: str, models_text: str) -> Iterator[tuple[str, Any, str, str]]:
                paths = [line.strip() for line in models_text.splitlines() if line.strip()]
                missing = [p for p in paths if not Path(p).expanduser().is_file()]
                if len(paths) < 2 or missing:
                    yield _error(f"give two or more existing models (missing: {missing})" if missing else
                                 "give two or more models"), [], "", ""
                    return
                command = [sys.executable, "-m", "merge_tools", "inspect", *paths, "--out", path, "--no-progress"]
                log = ""
                for log, _ in Job().run(command, REPO_ROOT):
                    yield "", [], "", log
                yield (*on_show(path), log)

            show.click(on_show, folder, [inspect_error, gallery, texts])
            compare.click(on_compare, [folder, inspect_models], [inspect_error, gallery, texts, inspect_log])
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sd-surge-gui", description="sd-scripts-surge GUI (gradio)")
    parser.add_argument("--listen", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio link (off by default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    build_app().queue().launch(server_name=args.listen, server_port=args.port, share=args.share, show_error=False)


if __name__ == "__main__":
    main()
