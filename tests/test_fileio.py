import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from sd_scripts_surge.models.fileio import (
    CheckpointError,
    atomic_output,
    check_finite,
    read_safetensors_header,
    save_safetensors_atomic,
)


@pytest.fixture()
def good_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(2, dtype=torch.float16)}, str(path), metadata={"x": "1"})
    return path


def test_header_reads_offsets_and_metadata(good_file):
    header = read_safetensors_header(good_file)
    assert header.metadata == {"x": "1"}
    assert header.tensors["a"].shape == (3, 4) and header.tensors["a"].torch_dtype == torch.float32
    raw = good_file.read_bytes()
    a = header.tensors["a"]
    assert torch.equal(torch.frombuffer(bytearray(raw[a.start:a.end]), dtype=torch.float32).view(3, 4),
                       torch.ones(3, 4))


def test_truncated_file_is_named(good_file):
    good_file.write_bytes(good_file.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(good_file)


def test_garbage_and_tiny_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_safetensors_header(bad)
    bad.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        read_safetensors_header(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_safetensors_header(tmp_path / "missing.safetensors")


def test_header_shape_that_lies_about_size(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"shape \[4, 4\]"):
        read_safetensors_header(path)


def test_check_finite_names_the_tensor():
    with pytest.raises(CheckpointError, match="'w' holds 1 NaN/Inf"):
        check_finite("w", torch.tensor([1.0, float("nan")]), "f.safetensors")
    check_finite("i", torch.tensor([1, 2]), "f.safetensors")


def test_atomic_output_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_refuses_to_overwrite_an_input(good_file):
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_safetensors_atomic({"a": torch.ones(1)}, good_file, protect=(good_file,))
    assert read_safetensors_header(good_file).metadata == {"x": "1"}
