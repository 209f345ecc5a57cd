"""Safe file handling shared by the trainer, model I/O and the merge tools.

Two jobs live here and nowhere else:
- reading a safetensors header *defensively*, so a truncated, corrupt or lying file fails with a message
  that names the file and what is wrong, before any tensor is touched;
- writing outputs atomically: a temp file beside the target, fsync, rename. A crash, Ctrl-C or full disk
  leaves the old file (or nothing) in place, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """'4GB', '3.5G', '512MiB', '2048' (bytes) -> bytes; decimal and binary units both mean powers of 1024, as
    kohya users write them (merge --memory-budget, --surge_cache_budget, --estimate_device)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}; write a size like 4GB, 512MB or a number of bytes")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


class CheckpointError(ValueError):
    """A checkpoint file cannot be used as it is. The message says which file and why."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading tensor data.

    Checks: file exists and is long enough, header length is sane, header is JSON of the right shape,
    every dtype is known, every byte range matches its shape and lies inside the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: only {size} bytes; not a safetensors file (truncated?)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: header length {header_len} does not fit in a {size}-byte file; "
                "the file is truncated or not safetensors (a .ckpt needs --allow_pickle)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        expected = info.numel * SAFETENSORS_DTYPES[dtype][1]
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} header says shape {list(shape)} {dtype} "
                f"({expected} bytes) but its data range holds {end - begin} bytes; the header is corrupt"
            )
        if info.end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {info.end} but the file has {size} bytes; "
                "the file is truncated (an interrupted download or copy?)"
            )
        tensors[name] = info
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start)


def check_finite(name: str, tensor: torch.Tensor, source: str | os.PathLike) -> None:
    """Raise CheckpointError if a floating tensor holds NaN or Inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{source}: tensor {name!r} holds {bad} NaN/Inf values")


def ensure_free_space(directory: str | os.PathLike, needed_bytes: int, margin: float = 1.05) -> None:
    """Fail early, before any work, when the disk cannot hold an output of `needed_bytes`."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * margin:
        raise OSError(
            f"not enough disk space in {directory}: need about {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free"
        )


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`.

    On any exception (Ctrl-C included) the temp file is removed and `path` is left as it was.
    `protect` lists input files: writing onto one of them is refused.
    """
    path = Path(path)
    resolved = path.resolve()
    for p in protect:
        if Path(p).resolve() == resolved:
            raise ValueError(f"refusing to overwrite input file {p}; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # directory fsync is best effort (not on every FS)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Save a state dict as safetensors through `atomic_output`, with a disk-space check first."""
    from safetensors.torch import save_file

    path = Path(path)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(path.parent, needed)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_output(path, protect=protect) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
    return path
