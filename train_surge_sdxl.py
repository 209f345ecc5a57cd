"""Surge training for SDXL, kohya sd-scripts style: `accelerate launch train_surge_sdxl.py --config_file cfg.toml`."""

from __future__ import annotations


def main() -> None:
    from sd_scripts_surge.training.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
