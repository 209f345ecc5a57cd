"""The surge-engine demo runs end to end on the tiny model and writes its heatmap and multipliers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from surge_helpers import restore_threads, use_one_thread

setup_module, teardown_module = use_one_thread, restore_threads
DEMO = Path(__file__).resolve().parent.parent / "examples" / "surge_engine_demo.py"


def test_demo_writes_heatmap_and_multipliers(tmp_path):
    spec = importlib.util.spec_from_file_location("surge_engine_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    result = demo.main(["--out", str(tmp_path), "--conditions", "1", "--timesteps", "200", "700",
                        "--num_seeds", "2", "--batch_size", "4", "--replay_steps", "5"])
    assert (tmp_path / "difference_heatmap.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "multipliers.json").read_text())
    assert saved["zones"]["high_difference"] == ["IN05", "OUT03"]  # the perturbed units
    assert "IN04" in saved["zones"]["anchors"]
    assert set(saved["multipliers"]) == set(saved["statistics"]) and len(saved["multipliers"]) == 21
    assert saved["replay"]["unit"] == "OUT03" and saved["flavor_cache_bytes"] > 0
    assert result["probes"] == 4
