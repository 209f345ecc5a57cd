"""Streaming safetensors I/O for the merge engine: ranged reads, an incremental writer, a resume journal.

Reads use ``os.preadv`` into fresh buffers at the byte offsets that ``fileio.read_safetensors_header``
validated: large sequential reads, no mmap (mapped pages would count toward the process' RSS and defeat
the memory budget), no whole-file load. The writer lays out the header first (offsets are known from the
plan), then fills tensor bytes in place with ``os.pwrite`` into ``.<name>.partial`` beside the output; a
journal ``.<name>.journal`` lists the keys whose bytes are durably written (fsync before the journal line),
so ``--resume`` continues an interrupted merge and produces the same bytes. ``finalize`` fsyncs and renames.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sd_scripts_surge.models.fileio import (
    SAFETENSORS_DTYPES,
    SafetensorsHeader,
    ensure_free_space,
    read_safetensors_header,
)
from sd_scripts_surge.models.fileio import check_finite as _check_finite

TORCH_TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class TensorReader:
    """Ranged reads of one safetensors file. Thread-safe (pread has no shared file position)."""

    def __init__(self, path: str | os.PathLike, header: SafetensorsHeader | None = None):
        self.path = Path(path)
        self.header = header or read_safetensors_header(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    def read(self, key: str, start: int = 0, stop: int | None = None,
             into: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Flat elements [start, stop) of tensor `key` in its stored dtype: a new 1-D tensor, or a view of the
        uint8 buffer `into(nbytes)` returns (a persistent one: no fresh memory to fault in)."""
        info = self.header.tensors[key]
        itemsize = SAFETENSORS_DTYPES[info.dtype][1]
        stop = info.numel if stop is None else stop
        nbytes = (stop - start) * itemsize
        # torch's allocator (huge pages when enabled), not numpy's
        buf = torch.empty(nbytes, dtype=torch.uint8) if into is None else into(nbytes)
        view = memoryview(buf.numpy())
        offset, done = info.start + start * itemsize, 0
        while done < nbytes:  # preadv may return short counts on some filesystems
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: unexpected end of file reading tensor {key!r}")
            done += got
        return buf.view(info.torch_dtype)


def file_fingerprint(path: str | os.PathLike, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """sha256 over the file size, the full header, and `samples` evenly spaced 64 KiB slices of the data.

    Fast (about 1 MiB read per file) and catches any change of keys, shapes, dtypes or metadata and most
    changes of weights; it is not a full-content hash (use sha256sum for that).
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    h.update(str(size).encode())
    with open(path, "rb") as f:
        head_len = int.from_bytes(f.read(8), "little")
        h.update(f.read(head_len))
        data_start, data_len = 8 + head_len, max(size - 8 - head_len, 0)
        for i in range(samples):
            offset = (
                data_start + (data_len - sample_bytes) * i // max(samples - 1, 1)
                if data_len > sample_bytes
                else data_start
            )
            f.seek(max(offset, data_start))
            h.update(f.read(sample_bytes))
    return h.hexdigest()


@dataclass(frozen=True)
class OutputEntry:
    key: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * SAFETENSORS_DTYPES[self.dtype][1]


def build_header(entries: Sequence[OutputEntry], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Serialized header (length prefix included, padded to 8 bytes) and each key's absolute data offset."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = {}, 0
    for e in entries:
        header[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        offsets[e.key] = pos
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    prefix = len(raw).to_bytes(8, "little")
    start = 8 + len(raw)
    return prefix + raw, {k: start + v for k, v in offsets.items()}


class SafetensorsWriter:
    """Write a safetensors file in place: header first, then tensor bytes at precomputed offsets."""

    def __init__(
        self, path: str | os.PathLike, entries: Sequence[OutputEntry], metadata: dict[str, str], reuse: bool = False
    ):
        self.path = Path(path)
        self.entries = {e.key: e for e in entries}
        header, self.offsets = build_header(entries, metadata)
        self.total_size = len(header) + sum(e.nbytes for e in entries)
        flags = os.O_RDWR | os.O_CREAT | (0 if reuse else os.O_TRUNC)
        self._fd = os.open(self.path, flags, 0o644)
        os.pwrite(self._fd, header, 0)
        os.ftruncate(self._fd, self.total_size)

    def write(self, key: str, start_element: int, values: torch.Tensor) -> None:
        """Write a chunk (already in the output dtype) of tensor `key` starting at flat element `start_element`."""
        raw = values.contiguous().view(torch.uint8).numpy()
        offset = self.offsets[key] + start_element * values.element_size()
        view, done = memoryview(raw), 0
        while done < len(raw):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def write_raw(self, key: str, raw: bytes | np.ndarray) -> None:
        view, done, offset = memoryview(raw).cast("B"), 0, self.offsets[key]
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Journal:
    """Append-only list of finished keys for one plan; first line = the plan's hash."""

    def __init__(self, path: str | os.PathLike, plan_hash: str):
        self.path = Path(path)
        self.plan_hash = plan_hash
        self._file = None

    def completed(self) -> set[str] | None:
        """Keys already durable for this plan, or None when there is no journal for this exact plan."""
        if not self.path.is_file():
            return None
        lines = self.path.read_text(encoding="utf-8").splitlines()
        if not lines:
            return None
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            return None
        if head.get("plan") != self.plan_hash:
            return None
        done = set()
        for line in lines[1:]:
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line is simply not done
                done.add(json.loads(line))
        return done

    def open(self, fresh: bool) -> None:
        if fresh:
            self.path.write_text(json.dumps({"plan": self.plan_hash}) + "\n", encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def mark(self, keys: Iterable[str]) -> None:
        assert self._file is not None
        for k in keys:
            self._file.write(json.dumps(k) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def finalize(partial: Path, output: Path) -> None:
    """fsync the finished partial file and atomically rename it onto the output path."""
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, output)
    with contextlib.suppress(OSError):  # directory fsync is best effort
        fd = os.open(output.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def refuse_overwrite(output: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """A clear error when `output` is one of the inputs (outputs never replace what they are made from)."""
    if not output.exists():
        return
    target = output.resolve()
    for p in inputs:
        if Path(p).resolve() == target:
            raise ValueError(f"{output}: the output would overwrite the input {p} (never overwrite an input); "
                             "choose another -o")


def side_paths(output: Path) -> tuple[Path, Path]:
    """(partial file, journal) paths beside the output."""
    return output.with_name(f".{output.name}.partial"), output.with_name(f".{output.name}.journal")


def copy_tensors(
    output: Path,
    plan: Mapping[str, tuple[TensorReader, str] | torch.Tensor],
    metadata: dict[str, str],
    chunk_elements: int = 1 << 24,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    dtypes: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    check_finite: bool = False,
) -> None:
    """Write `output` as the tensors `plan` names ({output key: (reader, source key)}, or a tensor already in
    memory), to a temp file that is fsynced and renamed; nothing is left behind on failure.

    Untransformed tensors stream chunk by chunk in their stored dtype (or `dtypes[key]`, a safetensors dtype
    name). A key in `transforms` is read whole and written as `transforms[key](tensor)` cast to its dtype, so
    memory stays at the largest transformed tensor. `progress(key)` is called after each tensor.
    `check_finite` refuses NaN/Inf in any floating chunk (CheckpointError naming the source and key).
    """
    transforms, dtypes = transforms or {}, dtypes or {}

    def info_of(key: str) -> tuple[str, tuple[int, ...]]:
        value = plan[key]
        if isinstance(value, torch.Tensor):
            return _torch_st_name(value.dtype), tuple(value.shape)
        reader, src = value
        return reader.header.tensors[src].dtype, tuple(reader.header.tensors[src].shape)

    entries = [OutputEntry(k, dtypes.get(k, info_of(k)[0]), info_of(k)[1]) for k in plan]
    partial, _ = side_paths(output)
    ensure_free_space(output.parent, sum(e.nbytes for e in entries))
    try:
        writer = SafetensorsWriter(partial, entries, metadata)
        try:
            for entry in entries:
                value = plan[entry.key]
                out_dtype = SAFETENSORS_DTYPES[entry.dtype][0]
                if isinstance(value, torch.Tensor):
                    if check_finite:
                        _check_finite(entry.key, value, "memory")
                    writer.write(entry.key, 0, value.reshape(-1).to(out_dtype))
                else:
                    reader, src = value
                    info = reader.header.tensors[src]
                    if entry.key in transforms:
                        whole = reader.read(src).view(tuple(info.shape))
                        if check_finite:
                            _check_finite(src, whole, reader.path)
                        writer.write(entry.key, 0, transforms[entry.key](whole).reshape(-1).to(out_dtype))
                    else:
                        for start in range(0, info.numel, chunk_elements):
                            chunk = reader.read(src, start, min(info.numel, start + chunk_elements))
                            if check_finite:
                                _check_finite(src, chunk, reader.path)
                            writer.write(entry.key, start, chunk.to(out_dtype) if entry.dtype != info.dtype else chunk)
                if progress is not None:
                    progress(entry.key)
            writer.sync()
        finally:
            writer.close()
        finalize(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _torch_st_name(dtype: torch.dtype) -> str:
    for name, (torch_dtype, _) in SAFETENSORS_DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no safetensors name")
