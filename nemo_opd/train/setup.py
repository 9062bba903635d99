"""Build what a run needs from its :class:`~nemo_opd.config.RunConfig`: tokenizer, examples,
the teacher/student agreement check, the quantized student, the frozen teacher and anchor.

Order matters for error messages: everything that can be checked from files (data, tokenizers,
config.json vocab sizes) is checked before any weight is loaded.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from nemo_opd.config import RunConfig
from nemo_opd.data import (
    EpochBatches,
    Example,
    PromptEncoder,
    SequenceBatch,
    encode_records,
    load_records,
)
from nemo_opd.models import (
    RecomputeConfig,
    build_gpt_model,
    check_parallel_fits,
    load_hf_gpt,
    read_hf_config,
)
from nemo_opd.models.pipeline import forward_logits
from nemo_opd.runtime import model_parallel_layout, model_process_groups

__all__ = ["check_models", "check_teacher_student_agreement", "load_tokenizer", "load_examples",
           "build_student", "build_fresh_student_shell", "build_teacher", "teacher_groups"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Probe texts beyond the training prompts: digits, spaces, punctuation and non-ASCII, where
# tokenizers of one family most often diverge.
_PROBES = ("question: what is 12 plus 30? answer: 42", "  leading spaces\tand tabs\n",
           "naïve café — ünïcödé ✓ 数学", "<|im_start|>user\nhi<|im_end|>")


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_examples(cfg: RunConfig, tokenizer: Any) -> tuple[list[Example], PromptEncoder]:
    encoder = PromptEncoder(tokenizer, cfg.data)
    return encode_records(load_records(cfg.data), encoder), encoder


def check_models(cfg: RunConfig, world_size: int, tokenizer: Any,
                 sample_texts: list[str]) -> None:
    """Everything about the two models that can be checked from their directories, before any
    weight loads: each layout shards its model (:func:`nemo_opd.models.check_parallel_fits`,
    experts included) and fits ``world_size`` ranks, the student is dense, and the vocabularies
    agree (:func:`check_teacher_student_agreement`). Raises ``ValueError`` naming the model."""
    models = [("student", cfg.model.student, cfg.model.student_parallel)]
    if not cfg.model.self_distillation:
        models.append(("teacher", cfg.model.teacher, cfg.model.teacher_parallel))
    for role, path, parallel in models:
        config = read_hf_config(path)
        try:
            check_parallel_fits(config, parallel)
            parallel.data_parallel_size(world_size)
        except ValueError as err:
            raise ValueError(f"model.{role}_parallel does not fit {path}: {err}") from None
        if role == "student" and config.is_moe:
            raise ValueError(f"model.student = {path} is a mixture-of-experts model "
                             f"({config.architecture}); the student must be dense (MoE models "
                             "are supported as teachers)")
    check_teacher_student_agreement(cfg, tokenizer, sample_texts)


def check_teacher_student_agreement(cfg: RunConfig, tokenizer: Any,
                                    sample_texts: list[str]) -> None:
    """Raise ``ValueError`` listing every difference between teacher and student vocabularies.

    Compared: ``vocab_size`` of both ``config.json`` files; and, when the teacher directory has a
    tokenizer of its own, the ids both tokenizers give the same texts (``sample_texts`` plus
    fixed probes) and their EOS/pad ids. Self-distillation shares everything: nothing to check.
    """
    if cfg.model.self_distillation:
        return
    student, teacher = read_hf_config(cfg.model.student), read_hf_config(cfg.model.teacher)
    problems = []
    if student.vocab_size != teacher.vocab_size:
        problems.append(f"vocab_size: student {student.vocab_size} != teacher "
                        f"{teacher.vocab_size}")
    if any((Path(cfg.model.teacher) / f).is_file() for f in _TOKENIZER_FILES):
        teacher_tok = load_tokenizer(cfg.model.teacher)
        for name in ("eos_token_id", "pad_token_id"):
            a, b = getattr(tokenizer, name), getattr(teacher_tok, name)
            if a != b:
                problems.append(f"{name}: student {a} != teacher {b}")
        mismatches = []
        for text in [*_PROBES, *sample_texts]:
            a = tokenizer(text, add_special_tokens=False)["input_ids"]
            b = teacher_tok(text, add_special_tokens=False)["input_ids"]
            if a != b:
                mismatches.append(f"text {text[:40]!r}: student ids {a[:8]} vs teacher ids "
                                  f"{b[:8]}")
        if mismatches:
            problems.append(f"{len(mismatches)} texts tokenize differently, e.g. "
                            + "; ".join(mismatches[:3]))
    if problems:
        raise ValueError("teacher and student vocabularies disagree (the distillation loss "
                         "compares distributions id by id): " + "; ".join(problems))


def teacher_groups(cfg: RunConfig) -> tuple[ProcessGroupCollection | None, Any]:
    """``(pg_collection, tp_group)`` of the teacher: the global (student's) groups when the
    layouts are equal, else its own (collective: every rank calls it)."""
    if cfg.model.teacher_parallel == cfg.model.student_parallel:
        return None, parallel_state.get_tensor_model_parallel_group()
    groups = model_process_groups(cfg.model.teacher_parallel)
    return groups, groups.tp


def build_teacher(cfg: RunConfig, pg_collection: ProcessGroupCollection | None
                  ) -> torch.nn.Module:
    """The frozen teacher: the teacher directory, or the student's original weights."""
    path = cfg.model.student if cfg.model.self_distillation else cfg.model.teacher
    teacher = load_hf_gpt(path, cfg.model.teacher_parallel,
                          dtype=_DTYPES[cfg.model.teacher_dtype], pg_collection=pg_collection,
                          quantizable=False)
    teacher.eval()
    teacher.requires_grad_(False)  # never holds gradients or optimizer state
    return teacher


def calibration_batches(cfg: RunConfig, examples: list[Example], pad_id: int
                        ) -> list[torch.Tensor]:
    """Token batches for PTQ calibration: the first micro batches of a dedicated, seeded
    order (not the training iterator's, whose position must not move)."""
    batches = EpochBatches(examples, cfg.optim.micro_batch_size, seed=cfg.seed + 1)
    out = []
    for _ in range(cfg.quant.calibration_batches):
        chunk = batches.next_batch()
        if all(e.response_ids for e in chunk):
            out.append(SequenceBatch.from_examples(chunk, pad_id).tokens)
        else:
            width = max(len(e.prompt_ids) for e in chunk)
            out.append(torch.tensor([list(e.prompt_ids) + [pad_id] * (width - len(e.prompt_ids))
                                     for e in chunk]))
    return out


def student_recompute(cfg: RunConfig) -> RecomputeConfig:
    """The student's activation recompute (the teacher never trains: it has none)."""
    return RecomputeConfig(cfg.model.recompute_granularity, cfg.model.recompute_method,
                           cfg.model.recompute_num_layers)


def build_student(cfg: RunConfig, calibration: list[torch.Tensor], *,
                  pg_collection: ProcessGroupCollection | None = None) -> torch.nn.Module:
    """The student from its HF weights, quantized and calibrated (QAT-ready), with LoRA
    adapters on the frozen quantized base when ``quant.lora``. ``pg_collection`` builds it on
    its own groups (``cfg.model.student_parallel`` must describe them), e.g. whole for
    evaluation next to a pipeline-parallel run."""
    from nemo_opd.quant.lora import LoraConfig, add_lora
    from nemo_opd.quant.student import quantize_student

    layout = (model_parallel_layout(pg_collection) if pg_collection is not None
              else contextlib.nullcontext())
    with layout:  # ModelOpt's quantizers read megatron's global layout
        student = load_hf_gpt(cfg.model.student, cfg.model.student_parallel,
                              dtype=_DTYPES[cfg.model.student_dtype],
                              recompute=student_recompute(cfg), pg_collection=pg_collection)
        if cfg.quant.format != "none":
            def forward_loop(model: torch.nn.Module) -> None:
                device = next(model.parameters()).device
                with torch.no_grad():
                    for tokens in calibration:
                        forward_logits(model, tokens.to(device))

            quantize_student(student, cfg.quant.format,
                             forward_loop if calibration else None)
        if cfg.quant.lora:
            add_lora(student, LoraConfig(rank=cfg.quant.lora_r, alpha=cfg.quant.lora_alpha))
    return student


def build_fresh_student_shell(cfg: RunConfig) -> torch.nn.Module:
    """An unquantized, randomly initialised student to load a checkpoint into."""
    return build_gpt_model(read_hf_config(cfg.model.student), cfg.model.student_parallel,
                           dtype=_DTYPES[cfg.model.student_dtype],
                           recompute=student_recompute(cfg))
