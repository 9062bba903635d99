"""Metrics sinks: what the JSONL and TensorBoard files hold, read back with TensorBoard's own
event reader (not our writer)."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing import event_accumulator

from nemo_opd.config import DataConfig, LoggingConfig, ModelConfig, RunConfig
from nemo_opd.train.metrics import MetricsLogger


def test_jsonl_and_tensorboard_hold_every_logged_scalar(tmp_path):
    cfg = RunConfig(model=ModelConfig(student="s", teacher="t"),
                    data=DataConfig(train_files=("train.jsonl",)), output_dir=str(tmp_path),
                    logging=LoggingConfig(every=2, jsonl=True, tensorboard=True,
                                          progress_bar=False))
    metrics = MetricsLogger(cfg, rank=0, total_steps=5)
    for step in range(1, 6):
        metrics.log(step, {"loss": 1.0 / step, "lr": 1e-4 * step, "note": "text is JSONL only"})
    metrics.log_event(5, "eval", {"addition": 0.75})
    metrics.close()
    assert MetricsLogger(cfg, rank=1, total_steps=5).jsonl_path is None  # rank 0 writes alone

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5, 5]  # every 2 steps, the last step, the event
    assert records[-1] == {"step": 5, "event": "eval", "addition": 0.75}

    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/addition", "train/loss", "train/lr"]
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(2, pytest.approx(0.5)), (4, pytest.approx(0.25)), (5, pytest.approx(0.2))]
