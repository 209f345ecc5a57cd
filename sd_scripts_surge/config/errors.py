"""The error every config problem raises, and the true/false reader shared by flags and TOML."""

from __future__ import annotations

import argparse


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it and where it came from."""


def parse_bool(value: str | bool) -> bool:
    """`true/false`, `yes/no`, `on/off`, `1/0` (any case) → bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")
