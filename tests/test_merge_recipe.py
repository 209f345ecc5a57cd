"""TOML recipes (nesting, MBW, errors) and the sd-merge CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_tools import methods
from merge_tools.cli import main
from merge_tools.engine import MergeOptions, merge
from merge_tools.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
P = "model.diffusion_model."
SD1_LIKE = {  # a few SD1-layout keys, tiny shapes: enough for detection (input_blocks up to 11) and MBW
    P + "time_embed.0.weight": (8, 4),
    P + "input_blocks.0.0.weight": (8, 4, 3, 3),
    P + "input_blocks.11.0.in_layers.2.weight": (8, 8),
    P + "middle_block.0.in_layers.2.weight": (8, 8),
    P + "output_blocks.3.0.in_layers.2.weight": (8, 8),
    P + "out.2.weight": (4, 8, 3, 3),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (16,),
}


def write_models(tmp: Path, names: list[str], shapes: dict | None = None) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    shapes = shapes or SD1_LIKE
    out = {}
    for name in names:
        p = tmp / f"{name}.safetensors"
        save_file({k: torch.randn(s, generator=g).half() for k, s in shapes.items()}, str(p))
        out[name] = p
    return out


def quiet(**kw) -> MergeOptions:
    return MergeOptions(progress=False, log=lambda s: None, **kw)


def test_nested_recipe_equals_composition(tmp_path: Path) -> None:
    m = write_models(tmp_path, ["base", "a", "b"])
    (tmp_path / "r.toml").write_text(
        """
[models]
base = "base.safetensors"
a = "a.safetensors"
b = "b.safetensors"

[nodes.final]
method = "add_difference"
inputs = ["a", { method = "ties", inputs = ["base", "a", "b"], k = 0.5 }, "base"]
alpha = 0.7

[output]
dtype = "fp32"
"""
    )
    recipe = load_recipe(tmp_path / "r.toml")
    out = tmp_path / "o.safetensors"
    merge(recipe, out, quiet(output_dtype="fp32"))
    sds = {k: load_file(str(p)) for k, p in m.items()}
    got = load_file(str(out))
    for key in SD1_LIKE:
        x = {k: sd[key].double() for k, sd in sds.items()}
        tied = methods.get("ties")([x["base"], x["a"], x["b"]], k=0.5)
        ref = methods.get("add_difference")([x["a"], tied, x["base"]], alpha=0.7).float()
        assert torch.equal(got[key], ref), key
    # the nested recipe is recorded in the metadata
    with safe_open(str(out), "pt") as f:
        rec = json.loads(f.metadata()["sd_merge_recipe"])
    assert rec["method"] == "add_difference" and rec["inputs"][1]["method"] == "ties"


def test_mbw_block_weights_apply_per_key(tmp_path: Path) -> None:
    m = write_models(tmp_path, ["a", "b", "c"])
    alphas = [i / 25 for i in range(26)]  # BASE=0, IN00=0.04 … IN11=0.48, M00=0.52, OUT00=0.56 … OUT11=1.0
    out = tmp_path / "o.safetensors"
    rc = main(
        [
            "add_difference",
            *(str(m[k]) for k in "abc"),
            "-o",
            str(out),
            "--dtype",
            "fp32",
            "--mbw",
            ",".join(map(str, alphas)),
            "--no-progress",
        ]
    )
    assert rc == 0
    sds = {k: load_file(str(p)) for k, p in m.items()}
    got = load_file(str(out))
    expect = {
        P + "time_embed.0.weight": 0.0,
        P + "input_blocks.0.0.weight": alphas[1],
        P + "input_blocks.11.0.in_layers.2.weight": alphas[12],
        P + "middle_block.0.in_layers.2.weight": alphas[13],
        P + "output_blocks.3.0.in_layers.2.weight": alphas[17],
        P + "out.2.weight": alphas[25],
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": 0.0,
    }
    for key, alpha in expect.items():
        a, b, c = (sds[k][key].double() for k in "abc")
        assert torch.equal(got[key], (a + (b - c) * alpha).float()), key


def test_mbw_wrong_length_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    m = write_models(tmp_path, ["a", "b", "c"])
    out = tmp_path / "o.safetensors"
    rc = main(["add_difference", *(str(m[k]) for k in "abc"), "-o", str(out), "--mbw", "0.5,0.5"])
    assert rc == 2 and not out.exists()
    assert "2 block weights given, sd1 has 26" in capsys.readouterr().err


@pytest.mark.parametrize(
    "body,message",
    [
        ('[models]\na="a.safetensors"\n[nodes.x]\nmethod="nope"\ninputs=["a"]\n', "unknown merge method 'nope'"),
        ('[models]\na="a.safetensors"\n[nodes.x]\nmethod="soup"\ninputs=["a"]\nkk=1\n', "no parameter"),
        ('[models]\na="a.safetensors"\n[nodes.x]\nmethod="soup"\ninputs=["zz"]\n', "refers to 'zz'"),
        (
            '[models]\na="a.safetensors"\n[nodes.x]\nmethod="soup"\ninputs=["y"]\n[nodes.y]\nmethod="soup"\ninputs=["x"]\n',
            "cycle",
        ),
        ('[models]\na="a.safetensors"\n[nodes.x]\nmethod="soup"\ninputs=["a"]\n[extra]\n', "unknown table"),
        ('[models]\na="a.safetensors"\n[nodes.x]\nmethod="soup"\ninputs=["a"]\n[output]\nformat="x"\n', "unknown key"),
        ('[models]\na="a.safetensors"\n[nodes.x]\nmethod="ties"\ninputs=["a"]\n', "at least 1 model"),
        ("[models\n", "not valid TOML"),
    ],
)
def test_recipe_errors_name_file_and_place(tmp_path: Path, body: str, message: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(RecipeError, match=message) as e:
        load_recipe(p)
    assert "bad.toml" in str(e.value)


def test_examples_parse() -> None:
    for p in sorted((REPO / "examples").glob("merge_*.toml")):
        recipe = load_recipe(p)
        assert recipe.root.models()


def test_cli_shortcuts_and_module_entry(tmp_path: Path) -> None:
    m = write_models(tmp_path, ["base", "a", "b"], shapes={"w": (32, 16), "b": (5,)})
    out = tmp_path / "t.safetensors"
    rc = main(
        [
            "ties",
            "--base",
            str(m["base"]),
            str(m["a"]),
            str(m["b"]),
            "-o",
            str(out),
            "--k",
            "0.2",
            "--threads",
            "1",
            "--memory-budget",
            "4GB",
            "--dtype",
            "fp16",
            "--no-progress",
        ]
    )
    assert rc == 0
    sds = [load_file(str(m[k])) for k in ("base", "a", "b")]
    ref = methods.get("ties")([sd["w"].double() for sd in sds], k=0.2).half()
    assert torch.equal(load_file(str(out))["w"], ref)
    soup = tmp_path / "s.safetensors"
    cmd = [sys.executable, "-m", "merge_tools", "soup", str(m["a"]), str(m["b"]), "-o", str(soup), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "estimated peak" in proc.stdout and "time estimate" in proc.stdout
    assert torch.equal(load_file(str(soup))["w"], ((sds[1]["w"].double() + sds[2]["w"].double()) / 2).half())


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["soup", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    assert rc == 2
    assert "missing.safetensors: file not found" in capsys.readouterr().err
    assert main(["methods"]) == 0
