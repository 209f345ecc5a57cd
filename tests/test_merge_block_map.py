"""sd-merge blocks: architecture, key → MBW block, parameters per block and component, from the header only."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from merge_tools.block_map import block_map
from merge_tools.cli import main

DATA = Path(__file__).parent / "data"


def sparse_checkpoint(path: Path, reference: str, skip_optional: bool = True) -> Path:
    """A safetensors file with a real key layout and full-size shapes whose data is a sparse hole (no disk used):
    enough for tools that read the header only."""
    components = json.loads((DATA / reference).read_text())["components"]
    header, offset = {}, 0
    sizes = {"float16": ("F16", 2), "float32": ("F32", 4), "int64": ("I64", 8), "int32": ("I32", 4)}
    for keys in components.values():
        for key, info in keys.items():
            if skip_optional and info.get("optional"):
                continue
            dtype, size = sizes[info.get("dtype", "float16")]
            n = 1
            for d in info["shape"]:
                n *= d
            header[key] = {"dtype": dtype, "shape": info["shape"], "data_offsets": [offset, offset + n * size]}
            offset += n * size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def test_full_size_sdxl_counts_per_block_and_component(tmp_path: Path):
    report = block_map(sparse_checkpoint(tmp_path / "sdxl.safetensors", "sdxl-sgm.json", skip_optional=False))
    assert report["architecture"] == "sdxl" and report["layout"] == "ldm"
    assert report["components"]["unet"] == 2_567_463_684  # SDXL base UNet
    assert report["components"]["text_encoder_2"] == pytest.approx(695e6, rel=0.01)
    assert report["components"]["text_encoder_1"] == pytest.approx(123e6, rel=0.01)
    assert report["components"]["vae"] == pytest.approx(83.7e6, rel=0.01)
    assert list(report["blocks"])[:2] == ["BASE", "IN00"] and list(report["blocks"])[-1] == "OUT08"
    assert len(report["blocks"]) == 20 and sum(report["blocks"].values()) == report["components"]["unet"]
    assert report["keys"]["model.diffusion_model.middle_block.1.proj_in.weight"]["block"] == "M00"
    assert report["keys"]["model.diffusion_model.out.2.weight"]["block"] == "OUT08"


def test_cli_json_and_png(tmp_path: Path, capsys):
    model = sparse_checkpoint(tmp_path / "sd1.safetensors", "sd1-ldm.json", skip_optional=False)
    out_json, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["blocks", str(model), "--json", str(out_json), "--png", str(png)]) == 0
    data = json.loads(out_json.read_text())
    assert data["architecture"] == "sd1" and len(data["blocks"]) == 26 and "ema" in data["components"]
    assert png.stat().st_size > 5000 and "M parameters" in capsys.readouterr().out
    assert main(["blocks", str(tmp_path / "missing.safetensors")]) == 2
