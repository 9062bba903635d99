"""The GPU smoke run (``scripts/gpu_smoke.sh``; skipped without CUDA, never needed by CI).

On one GPU, a world of one: a tiny Qwen3 on Transformer Engine layer specs (teacher: megatron's
full TE spec; student: ModelOpt's TE-compatible spec), bf16 parameters with fp32 master weights
in megatron's distributed optimizer, INT4 QAT → on-policy rollouts → 2 steps → checkpoint →
a new trainer resumes for step 3 → export of a ModelOpt unified checkpoint.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="needs Transformer Engine"),
]


def test_gpu_smoke(tmp_path, tiny_tokenizer):
    from nemo_opd.config import (
        CheckpointConfig,
        DataConfig,
        DistillConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        QuantConfig,
        RunConfig,
    )
    from nemo_opd.launch.plans import ExportPlan
    from nemo_opd.launch.stages import export_trained_student, whole_student_from_checkpoint
    from nemo_opd.models.tiny import TinyModelSpec, make_tiny_hf_model
    from nemo_opd.rollout import SamplingParams
    from nemo_opd.runtime import distributed_runtime
    from nemo_opd.train import Trainer

    model_dir = make_tiny_hf_model(tmp_path / "qwen3", "qwen3",
                                   TinyModelSpec(hidden_size=256, intermediate_size=512),
                                   seed=3, tokenizer=tiny_tokenizer)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"what is {i} plus {i}?",
                                              "response": f"{2 * i}"}) + "\n"
                                  for i in range(32)))
    cfg = RunConfig(
        model=ModelConfig(student=str(model_dir), student_dtype="bfloat16",
                          teacher_dtype="bfloat16"),
        data=DataConfig(train_files=(str(train_file),), max_response_length=8),
        quant=QuantConfig(format="int4", calibration_batches=2),
        distill=DistillConfig(lmbda=1.0, beta=1.0),
        sampling=SamplingParams(max_new_tokens=16),
        optim=OptimConfig(lr=1e-4, steps=3, micro_batch_size=8, use_distributed_optimizer=True),
        checkpoint=CheckpointConfig(save_every=1, keep_last=3),
        logging=LoggingConfig(progress_bar=False, tensorboard=False),
        output_dir=str(tmp_path / "run"))
    with distributed_runtime(cfg.model.student_parallel, seed=cfg.seed):
        trainer = Trainer(cfg)
        layer = trainer.models.teacher.decoder.layers[0]
        assert type(layer.self_attention.linear_qkv).__module__.startswith(
            "megatron.core.extensions.transformer_engine")
        optimizer = trainer.optim.optimizer
        names = {type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])}
        assert names == {"DistributedOptimizer"}, names
        student = trainer.models.student
        assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
        first = trainer.train(stop_after=2)
        assert [h["step"] for h in first.history] == [1, 2]
        assert all(h["on_policy_fraction"] == 1.0 for h in first.history)
        del trainer, student

        resumed = Trainer(cfg)
        assert resumed.start_step == 2
        second = resumed.train()
        assert [h["step"] for h in second.history] == [3]
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in first.history
                   + second.history)

        whole, _ = whole_student_from_checkpoint(cfg)
        [export_dir] = export_trained_student(whole, cfg, ExportPlan(enabled=True))
    quant = json.loads((export_dir / "hf_quant_config.json").read_text())
    assert "INT4" in json.dumps(quant).upper()
