"""Install with `pip install -e .` (see README). Versions are pinned in requirements.txt."""

from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="sd-scripts-surge",
    version="0.1.0",
    description="Surge distillation, ADA_SURGE/Cascade and FP64 streaming merges for kohya sd-scripts users",
    python_requires=">=3.10",
    packages=find_packages(include=["sd_scripts_surge*", "merge_tools*", "networks*", "library*"]),
    py_modules=["train_surge_sdxl"],
    include_package_data=True,
    install_requires=requirements,
    extras_require={"dev": ["pytest==9.2.0", "ruff==0.17.5"], "8bit": ["bitsandbytes==0.50.2"]},
    entry_points={
        "console_scripts": [
            "sd-surge-train=sd_scripts_surge.training.train:main",
            "sd-merge=merge_tools.cli:main",
            "sd-surge-gui=sd_scripts_surge.gui.app:main",
            "sd-surge-tiny=sd_scripts_surge.tiny.__main__:main",
        ]
    },
)
