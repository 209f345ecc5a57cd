"""Subprocesses for the GUI: start one, stream its log with a progress bar, stop it (saving state).

Output is read as raw bytes as it comes, so tqdm's carriage-return updates show up at once; a `\\r` rewrites
the current line as a terminal would. Progress is the last `N/M` or `P%` a tqdm bar printed.
"""

from __future__ import annotations

import html
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

_TQDM_COUNT = re.compile(r"(\d+)/(\d+) \[")
_TQDM_PCT = re.compile(r"(\d{1,3})%\|")


def progress_of(text: str) -> float | None:
    """The fraction done by the last tqdm bar in `text` (None if there is none)."""
    counts = _TQDM_COUNT.findall(text)
    if counts:
        done, total = (int(v) for v in counts[-1])
        return done / total if total else None
    pct = _TQDM_PCT.findall(text)
    return int(pct[-1]) / 100 if pct else None


def progress_html(fraction: float | None, label: str = "") -> str:
    pct = 0.0 if fraction is None else max(0.0, min(1.0, fraction)) * 100
    text = html.escape(label or (f"{pct:.0f}%" if fraction is not None else "waiting"))
    return (
        f'<div class="surge-progress" data-progress="{pct:.0f}" style="border:1px solid #888;border-radius:4px;'
        f'height:22px;position:relative"><div style="width:{pct:.1f}%;height:100%;background:#4a8"></div>'
        f'<span style="position:absolute;left:8px;top:2px">{text}</span></div>'
    )


class _Terminal:
    """Log text as a terminal shows it: `\\r` returns to the line start, `\\n` ends the line."""

    def __init__(self, head: str = ""):
        self.lines: list[str] = [head] if head else []
        self.current = ""

    def feed(self, chunk: str) -> None:
        for part in re.split(r"(\r\n|\n|\r)", chunk):
            if part in ("\n", "\r\n"):
                self.lines.append(self.current)
                self.current = ""
            elif part == "\r":
                self.current = ""  # the next write replaces the line (tqdm redraws it whole)
            else:
                self.current += part

    def text(self, limit: int = 2000) -> str:
        return "\n".join([*self.lines[-limit:], self.current])


def _stage(text: str) -> str:
    """The last tqdm bar's description and count, e.g. 'surge 1/2' (empty when there is none)."""
    bars = re.findall(r"([\w .-]{1,30}):\s*\d{1,3}%\|[^|]*\|\s*([\d.]+[kMG]?/[\d.]+[kMG]?)", text)
    return f"{bars[-1][0].strip()} {bars[-1][1]}" if bars else ""


class Job:
    """One running command. `run` yields (log, progress html) as output arrives; `stop` asks it to stop."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def run(self, command: Sequence[str], cwd: str | Path, done_label: str = "done") -> Iterator[tuple[str, str]]:
        if self.running:
            yield "a job is already running here; stop it first", progress_html(None, "busy")
            return
        term = _Terminal("$ " + shlex.join(command))
        yield term.text(), progress_html(0.0, "starting")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)  # own process group: Stop reaches all
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        fraction: float | None = 0.0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            text = chunk.decode(errors="replace")
            term.feed(text)
            now = progress_of(text)
            fraction = now if now is not None else fraction
            # a bar of one stage (caching, capture) may be full while the job goes on: 100 % means finished
            yield term.text(), progress_html(min(fraction or 0.0, 0.99), _stage(term.current or text))
        code = self.process.wait()
        self.process = None
        term.feed(f"\n[exit code {code}]\n")
        final = progress_html(1.0, done_label) if code == 0 else progress_html(fraction, f"failed (exit code {code})")
        yield term.text(), final

    def stop(self) -> str:
        """SIGINT to the job's process group: the trainer saves its state after the current step and exits."""
        if not self.running:
            return "nothing is running"
        assert self.process is not None
        os.killpg(os.getpgid(self.process.pid), signal.SIGINT)
        return "stop requested: the run saves its state after this step (resume with --resume)"
