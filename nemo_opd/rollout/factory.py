"""Build the run's rollout engine from its config, and check it before the first step.

``make_engine(cfg, model, tp_group, pad_id=..., eos_id=...)`` returns the engine
``cfg.rollout.engine`` names — "megatron"
(:class:`~nemo_opd.rollout.megatron_engine.MegatronEngine`, colocated), "hf"
(:class:`~nemo_opd.rollout.hf_engine.HFEngine`), "trtllm"
(:class:`~nemo_opd.rollout.trtllm_engine.TensorRTLLMEngine`) or "vllm"
(:class:`~nemo_opd.rollout.vllm_engine.VLLMEngine`), the last two imported only when asked for.
It has the trainer's ``engine_factory(model, tp_group)`` shape once ``cfg``, ``pad_id`` and
``eos_id`` are bound. The teacher (teacher-seeded rollouts) always gets the megatron engine: its
weights never change, so there is nothing to refit.

``check_rollout_setup(cfg)`` raises ``ValueError`` before any model loads when TensorRT-LLM or vLLM
is asked for and not installed, or TensorRT-LLM with ``sampling.min_new_tokens`` (which it cannot
honour; a pipeline-parallel student with rollouts is refused by
:class:`~nemo_opd.config.RunConfig` itself).
``check_engine(engine, model, tokenizer, cfg)`` raises ``ValueError`` before the first step for
an engine that cannot serve the run: a vocabulary or tokenizer other than the student's, or no
log-probs (of the kind the run samples with) when a loss needs the behaviour policy's log-probs —
the importance correction (``rollout.importance`` != "none") or the sampled-token loss
(``distill.loss`` == "sampled"). Weight shapes are checked by every engine's refit, the first of
which runs when the engine is built.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from nemo_opd.config import RunConfig
from nemo_opd.rollout.engine import RolloutEngine, engine_logprob_kinds, engine_returns_logprobs

__all__ = ["ENGINE_ROLES", "check_engine", "check_rollout_setup", "make_engine",
           "needs_rollout_logprobs"]

ENGINE_ROLES = ("student", "teacher")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_engine(cfg: RunConfig, model: torch.nn.Module, tp_group: Any, *, pad_id: int,
                eos_id: int | None, role: str = "student", **options: Any) -> RolloutEngine:
    """The rollout engine of ``cfg.rollout.engine`` on ``model``.

    Args:
        cfg: the run (``rollout.engine``, ``model.student``: the HF directory an external engine
            is shaped from, ``model.student_dtype``: the HF engine's default dtype).
        model: the student (or, with ``role="teacher"``, the teacher) module.
        tp_group: its tensor-parallel group.
        pad_id, eos_id: the trainer's tokenizer's pad and EOS ids.
        role: "student" or "teacher" (always the colocated megatron engine).
        options: passed to the engine's constructor (e.g. ``dtype=torch.bfloat16`` for the HF
            engine, ``llm_kwargs`` / ``logprob_kind`` for TensorRT-LLM and vLLM).

    Raises:
        ValueError: an unknown ``role``.
        nemo_opd.rollout.external.EngineUnavailable: TensorRT-LLM / vLLM not installed (an
            ``ImportError`` naming the container to run in).
    """
    if role not in ENGINE_ROLES:
        raise ValueError(f"role must be one of {ENGINE_ROLES}, got {role!r}")
    kind = cfg.rollout.engine if role == "student" else "megatron"
    common = dict(pad_id=pad_id, eos_id=eos_id, tp_group=tp_group)
    if kind == "megatron":
        from nemo_opd.rollout.megatron_engine import MegatronEngine

        return MegatronEngine(model, **common, **options)
    if kind == "hf":
        from nemo_opd.rollout.hf_engine import HFEngine

        options.setdefault("dtype", _DTYPES[cfg.model.student_dtype])
        return HFEngine(model, cfg.model.student, **common, **options)
    if kind == "trtllm":
        from nemo_opd.rollout.trtllm_engine import TensorRTLLMEngine

        return TensorRTLLMEngine(model, cfg.model.student, **common, **options)
    if kind == "vllm":
        from nemo_opd.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, cfg.model.student, **common, **options)
    raise ValueError(f"rollout.engine must be one of megatron/hf/trtllm/vllm, got {kind!r}")


_LIBRARIES = {"trtllm": ("tensorrt_llm", "TensorRT-LLM", "containers/Dockerfile.trtllm"),
               "vllm": ("vllm", "vLLM", "a vLLM container (vllm/vllm-openai)")}


def check_rollout_setup(cfg: RunConfig) -> None:
    """Raise ``ValueError`` for a rollout engine the config alone shows cannot run (see the
    module docstring); cheap, before any model loads."""
    engine = cfg.rollout.engine
    if engine == "trtllm" and cfg.sampling.min_new_tokens:
        raise ValueError("rollout.engine='trtllm' cannot honour sampling.min_new_tokens="
                         f"{cfg.sampling.min_new_tokens}: TensorRT-LLM's min_tokens masks only "
                         "its end_id, never the stop ids (nemo_opd.rollout.trtllm_engine); set "
                         "it to 0 or use another engine")
    if engine in _LIBRARIES:
        module, name, container = _LIBRARIES[engine]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"rollout.engine={engine!r} needs {name} ({module}), which is not "
                             f"installed here: run inside {container} (containers/README.md), "
                             "or use rollout.engine='megatron' or 'hf'")


def needs_rollout_logprobs(cfg: RunConfig) -> str | None:
    """Why the run needs the engine's log-probs of the sampled tokens (None: it does not)."""
    if cfg.rollout.importance != "none":
        return (f"rollout.importance={cfg.rollout.importance!r} weights rollout tokens by "
                "exp(log πθ − log μ) with the engine's log μ")
    if cfg.distill.loss == "sampled":
        return ("distill.loss='sampled' is an importance-sampled policy gradient over the "
                "engine's log-probs")
    return None


def _vocab_differences(ours: dict[str, int], theirs: dict[str, int]) -> str:
    differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])
    shown = ", ".join(f"{token!r}->{index}" for token, index in differ[:4])
    return f"{len(differ)} (token, id) pairs differ (e.g. {shown})"


def check_engine(engine: object, model: torch.nn.Module, tokenizer: Any, cfg: RunConfig) -> None:
    """Raise ``ValueError`` when ``engine`` cannot serve the run (see the module docstring).

    Args:
        engine: the student's rollout engine (any :class:`RolloutEngine`; the optional
            attributes ``vocab_size``, ``tokenizer``, ``eos_id``, ``returns_logprobs`` and
            ``logprob_kinds`` are read when present).
        model: the student module.
        tokenizer: the trainer's tokenizer (``cfg.model.tokenizer_path``'s).
        cfg: the run.
    """
    from nemo_opd.models.hf_config import read_hf_config
    from nemo_opd.rollout.hf_engine import _unwrap

    name = type(engine).__name__
    problems = []
    student_vocab = read_hf_config(cfg.model.student).vocab_size
    padded = getattr(_unwrap(model), "vocab_size", student_vocab)
    engine_vocab = getattr(engine, "vocab_size", None)
    if engine_vocab is not None and engine_vocab not in (student_vocab, padded):
        problems.append(f"its vocabulary has {engine_vocab} entries, the student's "
                        f"{student_vocab} ({cfg.model.student})")
    engine_tokenizer = getattr(engine, "tokenizer", None)
    if engine_tokenizer is not None and tokenizer is not None:
        ours, theirs = tokenizer.get_vocab(), engine_tokenizer.get_vocab()
        if ours != theirs:
            problems.append(f"its tokenizer differs from the trainer's: "
                            f"{_vocab_differences(ours, theirs)}")
    engine_eos = getattr(engine, "eos_id", None)
    if (tokenizer is not None and engine_eos is not None
            and engine_eos != tokenizer.eos_token_id):
        problems.append(f"it ends rows on EOS id {engine_eos}, the trainer's tokenizer's EOS is "
                        f"{tokenizer.eos_token_id}")
    why = needs_rollout_logprobs(cfg)
    if why is not None:
        wanted = "raw" if cfg.sampling.greedy else cfg.sampling.logprobs
        if not engine_returns_logprobs(engine):
            problems.append(f"it returns no log-probs, but {why}; use an engine that does, or "
                            "rollout.importance='none' with a loss other than 'sampled'")
        elif wanted not in engine_logprob_kinds(engine):
            problems.append(f"it records {'/'.join(engine_logprob_kinds(engine))} log-probs, "
                            f"but the run samples with sampling.logprobs={wanted!r} and {why}; "
                            f"build it with logprob_kind={wanted!r} or set sampling.logprobs")
    if problems:
        raise ValueError(f"rollout engine {name} ({cfg.rollout.engine!r}) cannot serve this run: "
                         + "; ".join(problems))
