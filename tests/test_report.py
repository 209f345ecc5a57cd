import json

from sd_scripts_surge.training.report import EpochRecord, TrainingHistory, write_report


def _history() -> TrainingHistory:
    h = TrainingHistory()
    for step in range(1, 6):
        h.log_step(step, {"task": 1.0 / step, "kd": 0.5 / step})
    h.log_step(6, {"task": 0.1})  # a term missing this step stays aligned as NaN
    for epoch in range(2):
        h.log_epoch(EpochRecord(epoch=epoch, multipliers={"IN00": 1.0, "M00": 2.0 + epoch},
                                relative_difference={"IN00": 0.01, "M00": 0.3}, anchors=["IN00"],
                                high_difference=["M00"],
                                replay=[{"unit": "M00", "accepted": True, "before": 0.3, "after": 0.2}]))
    return h


def test_log_step_keeps_series_aligned():
    h = _history()
    assert len(h.losses["task"]) == len(h.steps) == len(h.losses["kd"]) == 6
    assert h.losses["kd"][-1] != h.losses["kd"][-1]  # NaN


def test_report_writes_figures_and_round_trips(tmp_path):
    h = _history()
    page = write_report(h, tmp_path)
    text = page.read_text()
    for name in ("losses.png", "unit_lr_heatmap.png", "anchor_map.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert name in text
    restored = TrainingHistory.from_dict(json.loads((tmp_path / "history.json").read_text()))
    assert restored.epochs[1].multipliers == {"IN00": 1.0, "M00": 3.0}
    assert restored.steps == h.steps
