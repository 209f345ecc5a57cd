import sys

import pytest
import toml

from sd_scripts_surge.gui import app as gui


def test_defaults_bind_locally_and_share_nothing():
    args = gui.parse_args([])
    assert args.listen == "127.0.0.1" and args.share is False


def test_train_config_is_kohya_toml():
    config = gui.build_train_config("tiny:base", "tiny:teacher", "tiny:dataset", "out", "run", "ADA_SURGE",
                                    "cascade", 1e-3, 3, 2, True, 5, 0.5641895835, 8)
    text = toml.dumps(config)
    parsed = toml.loads(text)
    assert parsed["training"]["optimizer_type"] == "ADA_SURGE"
    assert parsed["network"] == {"network_module": "networks.lora", "network_dim": 8, "network_alpha": 4.0}
    assert parsed["model"]["teacher_model"] == "tiny:teacher"
    full = gui.build_train_config("a", "", "d", "o", "n", "AdamW", "constant", 1e-4, 1, 1, False, 5, 0.5, 0)
    assert "network" not in full and "teacher_model" not in full["model"]


def test_merge_command_and_errors():
    command = gui.merge_command("ties", "base.safetensors", "a.safetensors\n\n b.safetensors \n", "o.safetensors",
                                "--k 0.2")
    assert command[:4] == [sys.executable, "-m", "merge_tools", "ties"]
    assert command[4:] == ["--base", "base.safetensors", "a.safetensors", "b.safetensors", "-o", "o.safetensors",
                           "--k", "0.2"]
    with pytest.raises(ValueError, match="at least one model"):
        gui.merge_command("soup", "", "  \n", "o.safetensors")


def test_stream_command_reports_exit_code():
    chunks = list(gui.stream_command([sys.executable, "-c", "print('hello')"]))
    assert "hello" in chunks[-1] and "[exit code 0]" in chunks[-1]


def test_app_builds():
    pytest.importorskip("gradio")
    app = gui.build_app()
    assert app is not None
