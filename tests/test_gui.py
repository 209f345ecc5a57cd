"""The GUI's pieces without a browser: forms from the parser and registries, the TOML and recipe it writes,
the subprocess runner (progress, stop), the Inspect folder reader. Browser tests: test_gui_browser.py."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from merge_tools.recipe import parse_recipe
from sd_scripts_surge.config import parse_train_args
from sd_scripts_surge.gui import app as gui
from sd_scripts_surge.gui.runner import Job, progress_of


def test_defaults_bind_locally_and_share_nothing() -> None:
    args = gui.parse_args([])
    assert args.listen == "127.0.0.1" and args.share is False


def test_train_form_comes_from_the_trainer_parser_and_writes_a_toml_it_reads_back(tmp_path: Path) -> None:
    fields = gui.train_fields()
    by_dest = {a.dest: a for _, a in fields}
    assert gui.field_choices(by_dest["optimizer_type"])[0] == "ADA_SURGE"
    assert "cascade" in gui.field_choices(by_dest["lr_scheduler"])
    assert gui.field_kind(by_dest["surge_keep_mean_lr"]) == "bool"
    assert gui.field_kind(by_dest["teacher_lora"]) == "list"
    assert gui.field_help(by_dest["surge_shock_rate"])  # every surge knob explains itself
    raw = []
    page = {"pretrained_model_name_or_path": "tiny:base", "teacher_model": "tiny:teacher",
            "dataset_config": "tiny:dataset", "optimizer_type": "ADA_SURGE", "lr_scheduler": "cascade",
            "max_train_steps": 3.0, "learning_rate": 0.002, "surge_shock_rate": 4, "surge_keep_mean_lr": True,
            "output_dir": str(tmp_path / "out"), "teacher_lora": ""}
    for _, action in fields:
        raw.append(page.get(action.dest))
    values = gui.form_values(fields, raw)
    assert values["max_train_steps"] == 3 and "teacher_lora" not in values
    gui.validate_train_values(values)
    path = gui.write_config_file(values, tmp_path / "c.toml")
    config = parse_train_args(["--config_file", str(path)])
    assert config.optimizer_type == "ADA_SURGE" and config.lr_scheduler == "cascade"
    assert config.max_train_steps == 3 and config.surge.shock_rate == 4 and config.surge.keep_mean_lr is True
    loaded = gui.load_kohya_toml(str(path), fields)
    assert loaded[[a.dest for _, a in fields].index("learning_rate")] == pytest.approx(0.002)


def test_train_form_errors_are_messages() -> None:
    with pytest.raises(gui.FormError, match="does not exist"):
        gui.validate_train_values({"pretrained_model_name_or_path": "/nope.safetensors", "dataset_config": "x"})
    with pytest.raises(gui.FormError, match="dataset_config"):
        gui.validate_train_values({"pretrained_model_name_or_path": "tiny:base"})
    fields = gui.train_fields()
    raw = [2.5 if a.dest == "max_train_steps" else None for _, a in fields]
    with pytest.raises(gui.FormError, match="whole number"):
        gui.form_values(fields, raw)


def _models(tmp: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp / f"m{i}.safetensors"
        save_file({"w": torch.full((4,), float(i))}, str(p))
        paths.append(str(p))
    return paths


def test_merge_recipe_from_the_form(tmp_path: Path) -> None:
    base, a, b = _models(tmp_path, 3)
    recipe = gui.build_merge_recipe("ties", base, f"{a}\n\n {b} \n", {"k": 0.3}, None)
    assert recipe["nodes"]["merge"] == {"method": "ties", "inputs": ["base", "m0", "m1"], "k": 0.3}
    parse_recipe(recipe, tmp_path)  # a valid recipe
    with pytest.raises(gui.FormError, match="needs a base"):
        gui.build_merge_recipe("ties", "", a, {}, None)
    with pytest.raises(gui.FormError, match="not found"):
        gui.build_merge_recipe("soup", "", "/nope.safetensors", {}, None)
    with pytest.raises(gui.FormError, match="outside its range"):
        gui.build_merge_recipe("ties", base, a, {"k": 2.0}, None)
    with pytest.raises(gui.FormError, match="no block-weighted"):
        gui.build_merge_recipe("soup", "", a, {}, {"BASE": 1.0})
    # each method shows only its own parameters
    assert {m for m, n, _ in gui.method_params() if n == "k"} == {"ties"}


def test_progress_parsing_and_runner(tmp_path: Path) -> None:
    assert progress_of("surge:  40%|####      | 2/5 [00:01<00:02]") == pytest.approx(0.4)
    assert progress_of("merging:  75%|███▌ | 3.00M/4.00M") == pytest.approx(0.75)
    assert progress_of("nothing here") is None
    script = "import sys,time\nfor i in range(4):\n    sys.stderr.write(f'\\rrun: {i+1}/4 [00:00<00:00]')\n"
    outs = list(Job().run([sys.executable, "-c", script], tmp_path))
    log, bar = outs[-1]
    assert "[exit code 0]" in log and 'data-progress="100"' in bar
    job = Job()
    runs = job.run([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"], tmp_path)
    next(runs)
    next(runs)  # the child has started and printed
    assert job.running and "stop requested" in job.stop()
    start = time.time()
    last = list(runs)[-1][0]
    assert time.time() - start < 10 and "[exit code" in last and not job.running


def test_inspect_folder(tmp_path: Path) -> None:
    with pytest.raises(gui.FormError, match="not a folder"):
        gui.inspect_folder(str(tmp_path / "none"))
    with pytest.raises(gui.FormError, match="no report figures"):
        gui.inspect_folder(str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "unit_lr_heatmap.png")
    (tmp_path / "summary.json").write_text('{"loss": 0.5}')
    images, text = gui.inspect_folder(str(tmp_path))
    assert [c for _, c in images] == ["unit_lr_heatmap.png"] and "loss" in text


def test_app_builds() -> None:
    pytest.importorskip("gradio")
    assert gui.build_app() is not None
