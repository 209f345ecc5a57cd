"""Make ADA_SURGE and cascade first-class names in a kohya_ss checkout (and its sd-scripts submodule).

`python -m sd_scripts_surge.install_kohya PATH_TO_KOHYA_SS [--uninstall] [--dry-run]`:

1. copies `library/surge_optimizer.py` and `library/cascade_scheduler.py` into `PATH/sd-scripts/library/`;
2. patches `PATH/sd-scripts/library/train_util.py`: `get_optimizer` builds AdaSurge for `--optimizer_type ADA_SURGE`
   (any case; alias AdaSurge) and `get_scheduler_fix` builds CascadeLR for `--lr_scheduler cascade` with the
   total steps, warmup steps, cycles and min-LR ratio it gives `cosine_with_restarts` (upstream gives a custom
   `--lr_scheduler_type` only the optimizer and its args, and refuses a warmup);
3. patches `PATH/kohya_gui/class_basic_training.py`: `ADA_SURGE` in the Optimizer dropdown, `cascade` in the LR
   Scheduler dropdown (a fixed list there), and their default args in the args boxes' hints.

Every patch is an insertion at an anchor: the exact lines of the version we know. A file whose anchor is missing is
not touched and the run stops, printing the lines it expected. Before anything is written every changed file is
backed up under `PATH/.sd_scripts_surge_backup/` with a manifest (sha256 of the original and of what we wrote);
writes are atomic (temp file + rename). A second run changes nothing (idempotent), and `--uninstall` puts every
backed-up file back byte for byte and deletes the files we added — refusing a file someone changed since.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARK = "sd-scripts-surge"
BACKUP_DIR = ".sd_scripts_surge_backup"
REPO = Path(__file__).resolve().parents[2]
LIBRARY_FILES = ("surge_optimizer.py", "cascade_scheduler.py")
TRAIN_UTIL = "sd-scripts/library/train_util.py"
GUI_FILE = "kohya_gui/class_basic_training.py"


class InstallError(RuntimeError):
    """The checkout is not one this installer knows how to change; nothing was written."""


@dataclass(frozen=True)
class Patch:
    """Insert `text` before (or after) the exact `anchor` lines of a file."""

    file: str
    name: str
    anchor: str
    text: str
    after: bool = False

    def marker(self) -> str:
        return f"{MARK}: {self.name}"

    def apply(self, content: str) -> str:
        if self.marker() in content:
            return content  # already there
        if content.count(self.anchor) != 1:
            found = "not found" if self.anchor not in content else f"found {content.count(self.anchor)} times"
            raise InstallError(f"{self.file}: does not look like the version this installer knows ({self.name}: "
                               f"anchor {found}). Expected these lines:\n{self.anchor}")
        head, tail = content.split(self.anchor)
        return head + (self.anchor + self.text if self.after else self.text + self.anchor) + tail


OPTIMIZER_PATCH = Patch(
    TRAIN_UTIL, "ADA_SURGE optimizer",
    anchor="    if optimizer is None:\n        # 任意のoptimizerを使う\n",
    text=f"""    # {MARK}: ADA_SURGE optimizer (python -m sd_scripts_surge.install_kohya; --uninstall removes it)
    if optimizer is None and optimizer_type in ("ada_surge", "adasurge"):
        from library.surge_optimizer import AdaSurge

        logger.info(f"use ADA_SURGE optimizer | {{optimizer_kwargs}}")
        optimizer_class = AdaSurge
        optimizer = optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)

""")

SCHEDULER_PATCH = Patch(
    TRAIN_UTIL, "cascade scheduler",
    anchor="    name = SchedulerType(name)\n    schedule_func = TYPE_TO_SCHEDULER_FUNCTION[name]\n",
    text=f"""    # {MARK}: cascade scheduler, fed like cosine_with_restarts (python -m sd_scripts_surge.install_kohya)
    if name == "cascade":
        from library.cascade_scheduler import CascadeLR

        cascade_kwargs = {{"min_lr_ratio": min_lr_ratio}} if min_lr_ratio is not None else {{}}
        cascade_kwargs.update(lr_scheduler_kwargs)
        return CascadeLR(optimizer, num_training_steps=num_training_steps, warmup_steps=num_warmup_steps or 0,
                         num_cycles=num_cycles, **cascade_kwargs)

""")

GUI_OPTIMIZER_PATCH = Patch(
    GUI_FILE, "ADA_SURGE dropdown",
    anchor='                    "AdamW8bit",\n                    "Adafactor",\n',
    text=f'                    "ADA_SURGE",  # {MARK}: ADA_SURGE dropdown\n', after=True)

GUI_SCHEDULER_PATCH = Patch(
    GUI_FILE, "cascade dropdown",
    anchor='                    "adafactor",\n                    "constant",\n',
    text=f'                    "cascade",  # {MARK}: cascade dropdown\n', after=True)

GUI_OPTIMIZER_HINT = Patch(
    GUI_FILE, "ADA_SURGE args hint",
    anchor='                placeholder="(Optional) eg: relative_step=True scale_parameter=True warmup_init=True",\n',
    text=(f'                # {MARK}: ADA_SURGE args hint\n'
          '                info="ADA_SURGE: relative_step=False scale_parameter=False warmup_init=False '
          "shock_rate=5 state_dtype='fp32'\",\n"),
    after=True)

GUI_SCHEDULER_HINT = Patch(
    GUI_FILE, "cascade args hint",
    anchor='                placeholder="(Optional) eg: milestones=[1,10,30,50] gamma=0.1",\n',
    text=(f'                # {MARK}: cascade args hint\n'
          '                info="cascade: min_lr_ratio=0.1 spread=0.5 (steps, warmup and cycles come from the '
          'fields above)",\n'),
    after=True)

PATCHES = (OPTIMIZER_PATCH, SCHEDULER_PATCH, GUI_OPTIMIZER_PATCH, GUI_SCHEDULER_PATCH, GUI_OPTIMIZER_HINT,
           GUI_SCHEDULER_HINT)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_checkout(root: Path) -> None:
    for rel in (TRAIN_UTIL, GUI_FILE):
        if not (root / rel).is_file():
            raise InstallError(f"{root}: no {rel}; give the kohya_ss folder (with its sd-scripts submodule "
                               "checked out: git submodule update --init)")


def planned_changes(root: Path) -> dict[str, tuple[bytes | None, bytes]]:
    """{relative path: (current bytes or None if absent, bytes after install)} for every file install touches.
    Raises InstallError (nothing written) when a file is not the version we know."""
    check_checkout(root)
    changes: dict[str, tuple[bytes | None, bytes]] = {}
    for name in LIBRARY_FILES:
        rel = f"sd-scripts/library/{name}"
        target = root / rel
        new = (REPO / "library" / name).read_bytes()
        old = target.read_bytes() if target.exists() else None
        if old != new:
            changes[rel] = (old, new)
    for rel in (TRAIN_UTIL, GUI_FILE):
        old = (root / rel).read_bytes()
        text = old.decode("utf-8")
        for patch in PATCHES:
            if patch.file == rel:
                text = patch.apply(text)
        if text.encode("utf-8") != old:
            changes[rel] = (old, text.encode("utf-8"))
    return changes


def install(root: Path, dry_run: bool = False, out=print) -> dict[str, tuple[bytes | None, bytes]]:  # noqa: ANN001
    root = Path(root)
    changes = planned_changes(root)
    if not changes:
        out(f"{root}: ADA_SURGE and cascade are installed already; nothing to do")
        return changes
    for rel, (old, new) in changes.items():
        if old is None:
            out(f"add {rel} ({len(new)} bytes)")
        else:
            diff = difflib.unified_diff(old.decode("utf-8", "replace").splitlines(keepends=True),
                                        new.decode("utf-8", "replace").splitlines(keepends=True),
                                        f"a/{rel}", f"b/{rel}")
            out("".join(diff).rstrip("\n"))
    if dry_run:
        out("dry run: nothing written")
        return changes
    backup = root / BACKUP_DIR
    manifest_path = backup / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    for rel, (old, new) in changes.items():
        entry = manifest["files"].get(rel)
        if entry is None:  # first change of this file: keep the original as it was
            entry = {"existed": old is not None, "original_sha256": _sha(old) if old is not None else None}
            if old is not None:
                _write_atomic(backup / rel, old)
        entry["installed_sha256"] = _sha(new)
        manifest["files"][rel] = entry
    _write_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
    for rel, (_, new) in changes.items():
        _write_atomic(root / rel, new)
    out(f"installed into {root} (backups in {backup}); undo with --uninstall")
    return changes


def uninstall(root: Path, dry_run: bool = False, out=print) -> list[str]:  # noqa: ANN001
    root = Path(root)
    backup = root / BACKUP_DIR
    manifest_path = backup / "manifest.json"
    if not manifest_path.exists():
        raise InstallError(f"{root}: no {BACKUP_DIR}/manifest.json; nothing was installed here (or the backup "
                           "folder was removed)")
    manifest = json.loads(manifest_path.read_text())
    for rel, entry in manifest["files"].items():  # refuse before touching anything
        target = root / rel
        current = _sha(target.read_bytes()) if target.exists() else None
        if current not in (entry["installed_sha256"], entry["original_sha256"]):
            raise InstallError(f"{target} changed since the install (sha256 {current}); restore it by hand from "
                               f"{backup / rel} or re-run the install first")
    restored = []
    for rel, entry in manifest["files"].items():
        target = root / rel
        out(("would restore " if dry_run else "restore ") + rel if entry["existed"] else
            ("would remove " if dry_run else "remove ") + rel)
        if dry_run:
            continue
        if entry["existed"]:
            _write_atomic(target, (backup / rel).read_bytes())
        else:
            target.unlink(missing_ok=True)
        restored.append(rel)
    if not dry_run:
        shutil.rmtree(backup)
        out(f"uninstalled from {root}")
    return restored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts_surge.install_kohya", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kohya_ss", help="the kohya_ss folder (with sd-scripts/ checked out)")
    parser.add_argument("--uninstall", action="store_true", help="restore every changed file byte for byte")
    parser.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    args = parser.parse_args(argv)
    try:
        if args.uninstall:
            uninstall(Path(args.kohya_ss), args.dry_run)
        else:
            install(Path(args.kohya_ss), args.dry_run)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
