"""Streaming engine: chunk-size/thread invariance, validation, metadata, interrupt + resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_tools import engine, methods
from merge_tools.engine import MergeOptions, merge
from merge_tools.io import file_fingerprint
from merge_tools.recipe import single_method
from sd_scripts_surge.models.fileio import CheckpointError, parse_size

SHAPES = {"w.weight": (64, 200), "conv.weight": (16, 8, 3, 3), "v.bias": (9000,), "scalar": ()}
REPO = Path(__file__).resolve().parents[1]


def make_models(tmp: Path, n: int, dtype: torch.dtype = torch.float16, seed: int = 0) -> list[Path]:
    """base + n fine-tunes (small deltas, some large outliers), plus an integer buffer copied as-is."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    paths = []
    for i in range(n + 1):
        sd = {}
        for k, v in base.items():
            d = 0.0 if i == 0 else 0.05 * torch.randn(v.shape, generator=g)
            sd[k] = (v + d).to(dtype)
        sd["ids"] = torch.arange(7)
        p = tmp / f"m{i}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    return paths


def run(method: str, paths: list[Path], out: Path, params: dict | None = None, **opts) -> engine.MergeReport:
    opts.setdefault("progress", False)
    opts.setdefault("log", lambda s: None)
    return merge(single_method(method, [str(p) for p in paths], params or {}), out, MergeOptions(**opts))


CASES = [
    ("soup", {}, False),
    ("weighted_sum", {"weights": [0.2, 0.3, 0.5]}, False),
    ("task_arithmetic", {"lam": 0.5}, True),
    ("ties", {"k": 0.2}, True),
    ("ties_soup", {}, True),
    ("dare", {"p": 0.3}, True),
    ("tsd", {}, True),
    ("della", {"p": 0.2, "eps": -0.1}, True),
    ("model_stock", {}, True),
    ("model_stock", {"per_channel": True}, True),
    ("geometric_median", {}, False),
    ("tgmd", {}, True),
    ("dgmla", {}, True),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}, True),
    ("breadcrumbs_ties", {"density": 0.5}, True),
    ("della_linear", {"p": 0.2}, True),
    ("sce", {"select_topk": 0.5}, True),
    ("karcher", {}, False),
    ("multislerp", {}, True),
    ("nuslerp", {}, "base+2"),
    ("nuslerp", {"row_wise": True}, "base+2"),
    ("nearswap", {"t": 0.02}, "2"),
    ("train_difference", {}, "3"),
    ("add_perpendicular", {}, "3"),
    ("add_cosine_a", {"alpha": 0.2}, "2"),
    ("add_cosine_b", {}, "2"),
    ("rotate", {"alignment": 0.5, "alpha": 0.3}, "2"),
    ("crossover", {"tilt": 0.3}, "2"),
    ("clamp", {"stiffness": 0.5}, False),
    ("smooth_add", {}, "3"),
]


def _inputs(paths: list[Path], with_base: bool | str) -> list[Path]:
    return {True: paths, False: paths[1:], "base+2": paths[:3], "2": paths[1:3], "3": paths[:3]}[with_base]


@pytest.mark.parametrize(
    "method,params,with_base",
    CASES,
    ids=[f"{c[0]}{'-pc' if c[1].get('per_channel') else ''}{'-rows' if c[1].get('row_wise') else ''}" for c in CASES],
)
def test_bit_identical_for_any_chunk_size_and_threads(
    tmp_path: Path, method: str, params: dict, with_base: bool | str
) -> None:
    paths = make_models(tmp_path, 3)
    inputs = _inputs(paths, with_base)
    one = tmp_path / "one.safetensors"
    run(method, inputs, one, params, output_dtype="fp32")
    many = tmp_path / "many.safetensors"
    run(method, inputs, many, params, output_dtype="fp32", max_chunk_elements=500, threads=1)
    assert one.read_bytes() == many.read_bytes()
    # and the streamed result is the pure function of the whole tensors
    full = [load_file(str(p)) for p in inputs]
    got = load_file(str(one))
    for k in SHAPES:
        ref = methods.get(method)([sd[k].double() for sd in full], key=k, seed=0, **params).float()
        assert torch.equal(got[k], ref), k
    assert torch.equal(got["ids"], full[0]["ids"])


@pytest.mark.parametrize("chunk", [None, 500, 4096])
def test_persistent_buffers_give_the_pure_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk) -> None:
    """Two nodes of one method under a third share the run's workspace: each keeps its own buffers, buffers
    are reused across chunks and keys (grown, never leaked between nodes), and the bytes equal the pure calls."""
    from merge_tools.recipe import ModelRef, Node, Recipe

    paths = make_models(tmp_path, 3)
    refs = [ModelRef(f"m{i}", p) for i, p in enumerate(paths)]
    t1 = Node("ties", (refs[0], refs[1], refs[2]), {"k": 0.5})
    t2 = Node("ties", (refs[0], refs[3], refs[1]), {"k": 0.3})
    ta = Node("task_arithmetic", (refs[0], refs[2], refs[3]), {"lam": 0.7})
    root = Node("soup", (t1, t2, ta, refs[1]))
    gets, fresh = [0], [0]
    original = methods.Workspace.get

    def counting_get(self, key, numel, dtype):
        gets[0] += 1
        known = (*key, dtype) in self._buffers and self._buffers[(*key, dtype)].numel() >= numel
        fresh[0] += not known
        return original(self, key, numel, dtype)

    monkeypatch.setattr(methods.Workspace, "get", counting_get)
    out = tmp_path / "o.safetensors"
    merge(Recipe(root, {}, "test"), out,
          MergeOptions(progress=False, log=lambda s: None, output_dtype="fp32", max_chunk_elements=chunk, threads=1))
    if chunk is not None:  # many equal chunks: most requests are served by a buffer made earlier
        assert gets[0] > 3 * fresh[0], (gets, fresh)
    full = [load_file(str(p)) for p in paths]
    got = load_file(str(out))
    for k in SHAPES:
        x = [sd[k].double() for sd in full]
        a = methods.get("ties")([x[0], x[1], x[2]], key=k, seed=0, k=0.5)
        b = methods.get("ties")([x[0], x[3], x[1]], key=k, seed=0, k=0.3)
        c = methods.get("task_arithmetic")([x[0], x[2], x[3]], key=k, seed=0, lam=0.7)
        ref = methods.get("soup")([a, b, c, x[1]], key=k, seed=0).float()
        assert torch.equal(got[k], ref), k


def test_many_chunks_really_happen(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 2)
    seen = []

    class Spy(engine.KeyEvaluator):
        def prepare(self) -> None:
            seen.append((self.plan.key, len(self.plan.chunks)))
            super().prepare()

    original = engine.KeyEvaluator
    engine.KeyEvaluator = Spy
    try:
        run("ties", paths, tmp_path / "o.safetensors", {"k": 0.5}, max_chunk_elements=500)
    finally:
        engine.KeyEvaluator = original
    chunks = dict(seen)
    assert chunks["w.weight"] == 4  # 12800 elements, tensor statistics align chunks to 4096
    assert chunks["v.bias"] == 3


def test_output_dtypes_and_compute_fp32(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 2)
    for dt, torch_dt in [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]:
        out = tmp_path / f"{dt}.safetensors"
        run("soup", paths, out, output_dtype=dt)
        assert load_file(str(out))["w.weight"].dtype == torch_dt
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run("soup", paths, a, output_dtype="fp32", compute_dtype="fp32")
    run("soup", paths, b, output_dtype="fp32")
    assert torch.allclose(load_file(str(a))["w.weight"], load_file(str(b))["w.weight"], atol=1e-6)


def test_metadata_records_recipe_and_input_hashes(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 2)
    out = tmp_path / "o.safetensors"
    run("ties", paths, out, {"k": 0.3})
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["method"] == "ties" and recipe["params"] == {"k": 0.3} and len(recipe["inputs"]) == 3
    inputs = json.loads(meta["sd_merge_inputs"])
    assert [i["sha256_sampled"] for i in inputs] == [file_fingerprint(p) for p in paths]
    assert "sample" in meta["sd_merge_hash_method"]


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(10)}, str(p))
    h1 = file_fingerprint(p)
    save_file({"a": torch.ones(10)}, str(p))
    assert file_fingerprint(p) != h1


def test_refuses_to_overwrite_an_input(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 2)
    before = paths[1].read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite input"):
        run("soup", paths[1:], paths[1])
    assert paths[1].read_bytes() == before


def test_shape_mismatch_names_key_and_files(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 1)
    save_file({"w.weight": torch.zeros(3, 3), "ids": torch.arange(7)}, str(tmp_path / "odd.safetensors"))
    save_file({"w.weight": torch.zeros(4, 3), "ids": torch.arange(7)}, str(tmp_path / "odd2.safetensors"))
    with pytest.raises(CheckpointError, match=r"'w.weight' has different shapes.*odd.safetensors.*odd2.safetensors"):
        run("soup", [tmp_path / "odd.safetensors", tmp_path / "odd2.safetensors"], tmp_path / "o.safetensors")
    assert paths


def test_missing_keys_policies(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.ones(4), "only_a": torch.full((3,), 2.0)}, str(a))
    save_file({"x": torch.full((4,), 3.0)}, str(b))
    with pytest.raises(CheckpointError, match=r"only_a: missing in b.safetensors[\s\S]*--missing-keys"):
        run("soup", [a, b], tmp_path / "o.safetensors")
    run("soup", [a, b], tmp_path / "skip.safetensors", missing_keys="skip")
    assert set(load_file(str(tmp_path / "skip.safetensors"))) == {"x"}
    run("soup", [a, b], tmp_path / "base.safetensors", missing_keys="base", output_dtype="fp32")
    got = load_file(str(tmp_path / "base.safetensors"))
    assert torch.equal(got["only_a"], torch.full((3,), 2.0))  # b takes the base (first model) value
    assert torch.equal(got["x"], torch.full((4,), 2.0))


def test_nan_input_is_rejected_with_file_and_key(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 2)
    sd = load_file(str(paths[2]))
    sd["v.bias"][17] = float("nan")
    save_file(sd, str(paths[2]))
    for mode in ("pre", "stream"):
        out = tmp_path / f"{mode}.safetensors"
        with pytest.raises(CheckpointError, match=r"m2.safetensors: tensor 'v.bias' holds 1 NaN/Inf"):
            run("soup", paths, out, check_finite=mode)
        assert not out.exists()


def test_truncated_input_fails_before_work(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 2)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        run("soup", paths, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_memory_budget_below_process_size_is_a_clear_error(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 2)
    with pytest.raises(MemoryError, match="raise --memory-budget"):
        run("soup", paths, tmp_path / "o.safetensors", memory_budget=parse_size("10MB"))


def test_small_budget_forces_chunks(tmp_path: Path) -> None:
    import psutil

    g = torch.Generator().manual_seed(3)
    base = torch.randn(400, 1000, generator=g)
    paths = []
    for i in range(3):
        p = tmp_path / f"b{i}.safetensors"
        save_file({"big": (base + (0.05 * i) * torch.randn(base.shape, generator=g)).half()}, str(p))
        paths.append(p)
    ref, small = tmp_path / "ref.safetensors", tmp_path / "small.safetensors"
    run("ties", paths, ref, {"k": 0.2})
    seen = []

    class Spy(engine.KeyEvaluator):
        def prepare(self) -> None:
            if self.plan.key == "big":
                seen.append(len(self.plan.chunks))
            super().prepare()

    original = engine.KeyEvaluator
    engine.KeyEvaluator = Spy
    try:
        # 400k elements need ~40 MB in one chunk; 16 MB above the process size forces a few chunks
        run(
            "ties", paths, small, {"k": 0.2}, memory_budget=psutil.Process().memory_info().rss + (64 << 20) + (16 << 20)
        )
    finally:
        engine.KeyEvaluator = original
    assert seen[0] > 1
    assert ref.read_bytes() == small.read_bytes()
    with pytest.raises(MemoryError, match="tensor 'big'.*needs at least"):
        run("ties", paths, small, {"k": 0.2}, memory_budget=psutil.Process().memory_info().rss + (64 << 20) + (1 << 20))


def test_parse_size() -> None:
    assert parse_size("4GB") == 4 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("2048") == 2048
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_interrupt_then_resume_gives_same_bytes(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 3)
    ref = tmp_path / "ref.safetensors"
    run("ties", paths, ref, {"k": 0.2}, max_chunk_elements=1000)
    out = tmp_path / "out.safetensors"

    def stop_after_two(key: str, index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("ties", paths, out, {"k": 0.2}, max_chunk_elements=1000, on_key_done=stop_after_two)
    assert not out.exists()
    assert (tmp_path / ".out.safetensors.partial").exists() and (tmp_path / ".out.safetensors.journal").exists()
    report = run("ties", paths, out, {"k": 0.2}, resume=True)  # another chunk size: still the same bytes
    assert report.resumed_keys == 2
    assert out.read_bytes() == ref.read_bytes()
    assert not (tmp_path / ".out.safetensors.journal").exists()


def test_resume_with_changed_recipe_starts_over(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 2)
    out = tmp_path / "out.safetensors"

    def stop(key: str, index: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("ties", paths, out, {"k": 0.2}, on_key_done=stop)
    report = run("ties", paths, out, {"k": 0.3}, resume=True)
    assert report.resumed_keys == 0
    ref = tmp_path / "ref.safetensors"
    run("ties", paths, ref, {"k": 0.3})
    assert out.read_bytes() == ref.read_bytes()


def test_killed_process_resumes_to_same_bytes(tmp_path: Path) -> None:
    paths = make_models(tmp_path, 3)
    ref, out = tmp_path / "ref.safetensors", tmp_path / "out.safetensors"
    run("tgmd", paths, ref)
    script = f"""
import os, signal
from merge_tools import engine
from merge_tools.engine import MergeOptions, merge
from merge_tools.recipe import single_method
engine._JOURNAL_EVERY_S = 0.0
def kill(key, index):
    if index == 2:
        os.kill(os.getpid(), signal.SIGKILL)
merge(single_method("tgmd", {[str(p) for p in paths]!r}, {{}}), {str(out)!r},
      MergeOptions(progress=False, on_key_done=kill, max_chunk_elements=700))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    report = run("tgmd", paths, out, resume=True)
    assert report.resumed_keys >= 2
    assert out.read_bytes() == ref.read_bytes()


def test_disk_space_is_checked_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    paths = make_models(tmp_path, 2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "o.safetensors"
    with pytest.raises(OSError, match="not enough disk space"):
        run("soup", paths, out)
    assert not out.exists() and not (tmp_path / ".o.safetensors.partial").exists()


def test_inputs_are_closed_on_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plan → estimate → run: the input files are closed after success, a planning error and a run error."""
    opened = []
    real = engine.validate_inputs

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        readers, table = real(*args, **kwargs)
        opened.extend(readers)
        return readers, table

    monkeypatch.setattr(engine, "validate_inputs", spy)
    paths = make_models(tmp_path, 2)
    run("soup", paths, tmp_path / "ok.safetensors")
    with pytest.raises(MemoryError):
        run("soup", paths, tmp_path / "small.safetensors", memory_budget=1 << 20)
    bad = load_file(str(paths[1]))
    bad["w.weight"][0, 0] = float("nan")
    save_file(bad, str(paths[1]))
    with pytest.raises(CheckpointError):
        run("soup", paths, tmp_path / "nan.safetensors")
    assert len(opened) == 9 and all(r._fd == -1 for r in opened)
    assert not list(tmp_path.glob(".nan.safetensors*"))  # a bad input leaves no partial file or journal
