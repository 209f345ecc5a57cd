"""install_kohya: ADA_SURGE and cascade as first-class names in a kohya_ss tree (fake tree of the same shape)."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from library.cascade_scheduler import CascadeLR
from library.surge_optimizer import AdaSurge
from sd_scripts_surge.gui.kohya_installer import BACKUP_DIR, InstallError, install, main, uninstall

FAKE = Path(__file__).parent / "data" / "fake_kohya_ss"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "kohya_ss"
    shutil.copytree(FAKE, root)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_train_util(root: Path) -> types.ModuleType:
    names = ("library", "library.surge_optimizer", "library.cascade_scheduler")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(root / "sd-scripts"))
    try:  # import the copies inside the tree, as sd-scripts would; the suite's own modules come back after
        spec = importlib.util.spec_from_file_location("fake_train_util", root / "sd-scripts/library/train_util.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(root / "sd-scripts"))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def kohya_args(**overrides) -> types.SimpleNamespace:
    values = dict(optimizer_type="ADA_SURGE", optimizer_args=["relative_step=False", "shock_rate=4"],
                  learning_rate=1e-3, lr_scheduler="cascade", max_train_steps=100, lr_warmup_steps=10,
                  lr_scheduler_num_cycles=3, lr_scheduler_min_lr_ratio=0.1, lr_scheduler_args=["spread=0.5"])
    return types.SimpleNamespace(**(values | overrides))


def test_install_makes_first_class_names_and_uninstall_restores_every_byte(tree: Path):
    before = snapshot(tree)
    install(tree, out=lambda s: None)
    lib = tree / "sd-scripts" / "library"
    assert (lib / "surge_optimizer.py").read_bytes() == Path("library/surge_optimizer.py").read_bytes()
    assert (lib / "cascade_scheduler.py").is_file()
    assert (tree / BACKUP_DIR / "manifest.json").is_file()
    installed = snapshot(tree)
    install(tree, out=lambda s: None)  # idempotent
    assert snapshot(tree) == installed

    train_util = load_train_util(tree)
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    for spelling in ("ADA_SURGE", "ada_surge", "AdaSurge"):
        optimizer = train_util.get_optimizer(kohya_args(optimizer_type=spelling), params)[-1]
        assert type(optimizer).__name__ == AdaSurge.__name__ and optimizer.defaults["shock_rate"] == 4
    assert isinstance(train_util.get_optimizer(kohya_args(optimizer_type="AdamW", optimizer_args=[]), params)[-1],
                      torch.optim.AdamW)  # the rest of get_optimizer is untouched
    scheduler = train_util.get_scheduler_fix(kohya_args(), optimizer, 2)
    assert type(scheduler).__name__ == CascadeLR.__name__
    assert (scheduler.num_training_steps, scheduler.warmup_steps, scheduler.num_cycles) == (200, 10, 3)
    assert scheduler.min_lr_ratio == 0.1 and scheduler.spread == 0.5

    gui = ast.parse((tree / "kohya_gui" / "class_basic_training.py").read_text())
    dropdowns = {}
    for call in ast.walk(gui):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") in ("Dropdown", "Textbox"):
            kw = {k.arg: k.value for k in call.keywords}
            dropdowns[ast.literal_eval(kw["label"])] = kw
    assert "ADA_SURGE" in ast.literal_eval(dropdowns["Optimizer"]["choices"])
    assert "cascade" in ast.literal_eval(dropdowns["LR Scheduler"]["choices"])
    assert "shock_rate" in ast.literal_eval(dropdowns["Optimizer extra arguments"]["info"])
    assert "min_lr_ratio" in ast.literal_eval(dropdowns["LR scheduler extra arguments"]["info"])

    uninstall(tree, out=lambda s: None)
    assert snapshot(tree) == before


def test_dry_run_writes_nothing(tree: Path):
    before = snapshot(tree)
    lines: list[str] = []
    changes = install(tree, dry_run=True, out=lines.append)
    assert changes and snapshot(tree) == before and "dry run" in lines[-1]
    assert any('+                    "ADA_SURGE"' in line for line in lines)


def test_unknown_version_is_refused_with_the_expected_lines_and_nothing_written(tree: Path):
    gui = tree / "kohya_gui" / "class_basic_training.py"
    gui.write_text(gui.read_text().replace('"AdamW8bit",', '"AdamW8bit",  # moved'))
    before = snapshot(tree)
    with pytest.raises(InstallError, match="does not look like the version") as info:
        install(tree, out=lambda s: None)
    assert '"AdamW8bit",\n                    "Adafactor",' in str(info.value)
    assert snapshot(tree) == before and not (tree / BACKUP_DIR).exists()


def test_uninstall_refuses_a_file_changed_since(tree: Path, capsys):
    install(tree, out=lambda s: None)
    train_util = tree / "sd-scripts" / "library" / "train_util.py"
    train_util.write_text(train_util.read_text() + "# edited by hand\n")
    with pytest.raises(InstallError, match="changed since the install"):
        uninstall(tree, out=lambda s: None)
    assert main([str(tree / "nowhere")]) == 2
    assert "error:" in capsys.readouterr().err
