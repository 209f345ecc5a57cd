"""The option reference (docs/options.md), generated from the schema so it cannot drift from the flags.

    python -m sd_scripts_surge.config.reference > docs/options.md
"""

from __future__ import annotations

from sd_scripts_surge.config.schema import GROUPS, Declared, all_options


def _default(d: Declared) -> str:
    value = d.default
    if value is None or value == [] or value == "":
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _range(d: Declared) -> str:
    o = d.option
    if o.choices is not None:
        return " / ".join(f"`{c}`" for c in o.choices)
    low = f"≥ {o.ge:g}" if o.ge is not None else f"> {o.gt:g}" if o.gt is not None else ""
    high = f"≤ {o.le:g}" if o.le is not None else ""
    return ", ".join(p for p in (low, high) if p)


def _where(d: Declared) -> str:
    flag = f"`--{d.dest}`" if d.option.cli else ""
    if not d.option.toml:
        return flag
    if d.dest.startswith("surge_"):
        key = f"`[surge] {d.dest[len('surge_'):]}`"
    else:
        key = f"`{d.dest}`"
    return f"{flag}<br>{key}" if flag else key


def markdown() -> str:
    """Every option by help group: flag and TOML key, default, allowed values, help."""
    lines = ["# Training options", "",
             "Generated from `sd_scripts_surge/config/schema.py` by `python -m sd_scripts_surge.config.reference`; "
             "`tests/test_config_schema.py` fails when this file is out of date. Flags typed on the command line beat "
             "the `--config_file` TOML, which beats the defaults. In a TOML any section name works for the plain keys "
             "(they are flattened one level, as in sd-scripts); `[surge]` keys are the `--surge_*` flags without the "
             "prefix.", ""]
    options = all_options()
    for title, description in GROUPS.items():
        lines += [f"## {title}", "", description[0].upper() + description[1:] + ".", "",
                  "| flag / TOML key | default | values | what it does |", "|---|---|---|---|"]
        for d in options:
            if d.option.group == title:
                text = d.option.help.replace("|", "\\|")
                lines.append(f"| {_where(d)} | {_default(d)} | {_range(d)} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
