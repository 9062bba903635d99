"""One scored batch: teacher forward (no grad) → student forward → loss → backward.

Shapes. Sequences are ``tokens [B, T]``; both models return vocab-parallel logits
``[B, T, V/tp]`` (each on its own TP group). Logits at position ``t`` predict ``tokens[:, t+1]``,
so every loss below consumes ``logits[:, :-1]`` against ``tokens[:, 1:]`` with the mask
``loss_mask[:, 1:]`` (a token carries loss when its prediction is scored).

Teacher side by ``DistillConfig.loss``:

* ``"full"``: the teacher's vocab-sharded logits (teacher TP = student TP, same shards);
* ``"topk"``: :func:`~nemo_opd.loss.teacher_topk` on the teacher's own TP group — a
  :class:`~nemo_opd.loss.TeacherTopK` replicated on every rank, so a teacher on a smaller TP
  group serves the student's larger one; optionally cached on disk for dataset sequences;
* ``"sampled"``: the teacher's log-probs of the scored tokens (seed 003's advantage).

The loss is a mean over this batch's loss tokens (each loss's own reduction), times the part's
weight over the number of micro batches, so accumulated gradients average micro batches. The
KL anchor adds ``γ · KL(student ‖ anchor)`` over the same tokens.

Metrics (no grad, same tokens, loss temperature): forward KL(T‖S) and reverse KL(S‖T) — over
the full vocabulary when the teacher's logits are on the student's layout, else over the
teacher's top-k + tail buckets — and the teacher's NLL of the scored tokens at temperature 1.

Importance correction (:class:`ImportanceCorrection`, ``RolloutConfig.importance``): rollout
and replayed tokens were drawn from the engine's behaviour policy ``μ``, whose log-probs the
batch carries. From the student logits of the loss forward (no second forward, no grad) the
trainer's ``log πθ(x_t)`` is recomputed under the same distribution (``"sampling"``: the
sampling temperature / top-k / top-p and the stop ids banned before ``min_new_tokens``;
``"raw"``: the plain softmax), ``ρ_t = πθ(x_t)/μ(x_t)``, and each token's loss is weighted by
``w_t`` (:func:`~nemo_opd.loss.importance_weights`: truncate ``min(ρ_t, cap)``, mask ``ρ_t``
inside ``[1/cap, cap]`` else 0, none 1); the reductions keep their denominators. The sampled
loss takes ``w_t`` by source: fresh rollouts ``w_t · PPO(exp(ℓ_t − sg ℓ_t))`` (PPO against the
student that sampled them, the current one: value 1), replayed ones ``PPO(exp(ℓ_t − sg ℓ_t) ·
w_t)`` (an older student sampled them, so the corrected ratio to ``μ`` is the PPO ratio; with
"none" the uncorrected ``ρ_t``, as staleness must still be corrected). Without clipping both are
``w_t · (−A_t)`` per token. Dataset tokens get weight 1; the KL anchor and the metrics are not
weighted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_opd.config import DistillConfig, RolloutConfig
from nemo_opd.data.batch import SequenceBatch
from nemo_opd.loss import (
    TeacherTopK,
    generalized_jsd,
    importance_stats,
    importance_weights,
    sampled_token_reverse_kl,
    sampling_logprobs,
    teacher_topk,
    topk_generalized_jsd,
    vocab_parallel_logprobs,
)
from nemo_opd.loss.importance import IMPORTANCE_CORRECTIONS, LOGPROB_KINDS
from nemo_opd.models.pipeline import forward_backward, forward_logits, last_stage_rank
from nemo_opd.rollout.engine import SamplingParams
from nemo_opd.runtime import runtime_device
from nemo_opd.strategies import TeacherContext
from nemo_opd.train.divergence import DivergenceError

__all__ = ["ImportanceCorrection", "ScoringModels", "ScoreResult", "NonFiniteLossError",
           "TeacherTopKCache", "score_batch", "stop_if_nonfinite"]


class NonFiniteLossError(DivergenceError):
    """A loss, gradient norm or rollout logit was NaN/inf; training stopped without saving."""


@dataclasses.dataclass
class ScoringModels:
    """The models one scored batch needs, and their tensor-parallel groups."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    student_tp_group: dist.ProcessGroup | None
    teacher_tp_group: dist.ProcessGroup | None
    same_layout: bool
    """Teacher logits are sharded exactly like the student's (same TP size)."""
    teacher_context: TeacherContext = dataclasses.field(default_factory=TeacherContext)
    anchor: torch.nn.Module | None = None
    """Frozen initial student (kl_anchored)."""
    teacher_batch_group: dist.ProcessGroup | None = None
    """Set when the teacher's TP group spans several student data-parallel ranks (teacher TP >
    student TP): the group over which their batches are gathered for one teacher forward."""
    teacher_lockstep_group: dist.ProcessGroup | None = None
    """A teacher on its own layout: its TP × EP × PP ranks, whose forwards are collective with
    this rank's (gathered batches, pipeline stages, MoE all-to-alls). They skip the teacher
    (cache hits) only all together."""


@dataclasses.dataclass
class ScoreResult:
    """What one scored batch reports (floats, identical on every TP rank)."""

    loss: float
    """The batch's loss before part weight and accumulation scaling."""
    forward_kl: float
    reverse_kl: float
    teacher_nll: float
    """NaN when the teacher side came from the cache (no logits to score the tokens with)."""
    anchor_kl: float
    loss_tokens: int
    teacher_seconds: float
    student_seconds: float
    teacher_cache_hit: bool = False
    importance_kl: float = math.nan
    """Mean over the batch's rollout tokens of ``log μ − log πθ`` (engine vs trainer, same
    kind): an estimate of ``KL(μ‖πθ)``. The importance fields are NaN for dataset batches and
    when no correction ran (:func:`~nemo_opd.loss.importance_stats`)."""
    importance_ratio_min: float = math.nan
    """Min / mean / max over the rollout tokens of ``ρ = πθ(x_t) / μ(x_t)``."""
    importance_ratio_mean: float = math.nan
    importance_ratio_max: float = math.nan
    importance_masked_fraction: float = math.nan
    """Fraction of rollout tokens whose importance weight is 0 (dropped)."""


@dataclasses.dataclass(frozen=True)
class ImportanceCorrection:
    """How :func:`score_batch` weights rollout tokens for an engine whose numerics differ from
    the trainer's (see the module docstring), and the sampling distribution the engine's
    ``"sampling"`` log-probs are under."""

    mode: str = "truncate"
    """``RolloutConfig.importance``: "truncate", "mask" or "none"."""
    cap: float = 2.0
    """``RolloutConfig.importance_cap`` (> 1)."""
    temperature: float = 1.0
    """Sampling temperature (> 0; greedy rollouts record raw log-probs)."""
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    """Stop ids are banned from the sampling distribution while fewer response tokens than
    this were written (response position ``t − prompt_length < min_new_tokens``)."""
    stop_ids: tuple[int, ...] = ()
    """The sampling config's stop ids and the engine's EOS."""
    kind: str = "sampling"
    """The log-prob kind the engine records (:data:`~nemo_opd.rollout.LogprobKind`), assumed for
    batches that do not carry one (replayed rows stored by an older version)."""

    def __post_init__(self) -> None:
        if self.mode not in IMPORTANCE_CORRECTIONS:
            raise ValueError(f"ImportanceCorrection.mode must be one of "
                             f"{IMPORTANCE_CORRECTIONS}, got {self.mode!r}")
        if not isinstance(self.cap, (int, float)) or not 1 < self.cap < math.inf:
            raise ValueError(f"ImportanceCorrection.cap must be a finite number > 1, got "
                             f"{self.cap!r}")
        if self.kind not in LOGPROB_KINDS:
            raise ValueError(f"ImportanceCorrection.kind must be one of {LOGPROB_KINDS}, got "
                             f"{self.kind!r}")

    @classmethod
    def from_config(cls, rollout: RolloutConfig, sampling: SamplingParams,
                    eos_id: int | None) -> ImportanceCorrection:
        """From the run's ``rollout`` and ``sampling`` sections and the EOS id the engines stop
        at (what the engines' :func:`~nemo_opd.rollout.sample_tokens` did)."""
        greedy = sampling.greedy
        return cls(mode=rollout.importance, cap=float(rollout.importance_cap),
                   temperature=1.0 if greedy else float(sampling.temperature),
                   top_k=sampling.top_k, top_p=float(sampling.top_p),
                   min_new_tokens=sampling.min_new_tokens,
                   stop_ids=tuple(sorted(set(sampling.stop_token_ids) | ({eos_id} - {None}))),
                   kind="raw" if greedy else sampling.logprobs)


class TeacherTopKCache:
    """Teacher top-k log-probs of dataset sequences on disk, one file per example.

    The key hashes the example's tokens, k and the temperature, so a changed dataset, k or
    temperature never reads stale entries. Writes go to a temporary file then ``os.replace``
    (several ranks writing the same entry is harmless).
    """

    def __init__(self, directory: str | Path, k: int, temperature: float) -> None:
        self.dir, self.k, self.temperature = Path(directory), k, temperature
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, tokens: list[int]) -> Path:
        digest = hashlib.sha1(f"{self.k}/{self.temperature}/{tokens}".encode()).hexdigest()
        return self.dir / f"{digest}.pt"

    def load(self, batch: SequenceBatch, device: torch.device) -> TeacherTopK | None:
        """The batch's ``[B, T-1, k]`` top-k (padding rows zero) if every row is cached."""
        rows = []
        for r in range(batch.tokens.shape[0]):
            path = self._path(batch.tokens[r, :int(batch.lengths[r])].tolist())
            if not path.is_file():
                return None
            rows.append(torch.load(path))
        shape = (batch.tokens.shape[0], batch.tokens.shape[1] - 1)
        logprobs = torch.zeros(*shape, self.k)
        indices = torch.zeros(*shape, self.k, dtype=torch.int64)
        log_tail = torch.zeros(shape)
        for r, row in enumerate(rows):
            n = row["indices"].shape[0]
            logprobs[r, :n], indices[r, :n], log_tail[r, :n] = (row["logprobs"], row["indices"],
                                                                row["log_tail"])
        return TeacherTopK(logprobs.to(device), log_tail.to(device), indices.to(device),
                           self.temperature)

    def store(self, batch: SequenceBatch, top: TeacherTopK) -> None:
        for r in range(batch.tokens.shape[0]):
            n = int(batch.lengths[r])
            path = self._path(batch.tokens[r, :n].tolist())
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"logprobs": top.logprobs[r, :n - 1].cpu().clone(),
                        "indices": top.indices[r, :n - 1].cpu().clone(),
                        "log_tail": top.log_tail[r, :n - 1].cpu().clone()}, tmp)
            os.replace(tmp, path)


def _teacher_forward(models: ScoringModels, tokens: torch.Tensor) -> torch.Tensor | None:
    """Teacher logits aligned to the student's prediction positions: ``[B, T-1, V/tp_t]`` on
    the teacher's last pipeline stage, None on its other stages."""
    context = models.teacher_context
    logits = forward_logits(models.teacher, context.inputs(tokens))
    return None if logits is None else context.align(logits, tokens.shape[1])[:, :-1]


def _gather_rows(x: torch.Tensor, group: dist.ProcessGroup, fill: float | int = 0
                 ) -> torch.Tensor:
    """``[B, T, ...]`` of every rank of ``group`` → ``[ranks × B, T_max, ...]`` (rank order),
    each right-padded with ``fill`` to the longest ``T``."""
    length = torch.tensor([x.shape[1]], device=x.device)
    lengths = [torch.empty_like(length) for _ in range(dist.get_world_size(group))]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(n) for n in lengths)
    padded = torch.full((x.shape[0], longest, *x.shape[2:]), fill, dtype=x.dtype,
                        device=x.device)
    padded[:, :x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded.contiguous(), group=group)  # gloo: contiguous only
    return torch.cat(parts)


def _teacher_scores(models: ScoringModels, t_logits: torch.Tensor, targets: torch.Tensor,
                    mask: torch.Tensor, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """Per-row teacher outputs of ``[N, T-1]`` positions: ``nll`` (log-probs of the targets at
    temperature 1, masked), ``lp`` (at the loss temperature, "sampled" loss), ``top_*`` (top-k
    and tail, when the student cannot read the teacher's logits directly or loss="topk")."""
    t_group = models.teacher_tp_group
    scores = {"nll": vocab_parallel_logprobs(t_logits, targets, mask=mask, tp_group=t_group)}
    if cfg.loss == "sampled":
        scores["lp"] = vocab_parallel_logprobs(t_logits, targets, temperature=cfg.temperature,
                                               mask=mask, tp_group=t_group)
    if cfg.loss == "topk" or not models.same_layout:
        top = teacher_topk(t_logits, cfg.topk, temperature=cfg.temperature, tp_group=t_group)
        scores.update(top_logprobs=top.logprobs, top_log_tail=top.log_tail,
                      top_indices=top.indices)
    return scores


def _from_teacher_last_stage(models: ScoringModels, scores: dict[str, torch.Tensor] | None,
                             device: torch.device) -> dict[str, torch.Tensor]:
    """The teacher's last pipeline stage's ``scores`` on all its stages (top-k sized: the
    full-vocabulary logits never travel)."""
    group = models.teacher.pg_collection.pp
    box = [None if scores is None else {k: v.cpu() for k, v in scores.items()}]
    dist.broadcast_object_list(box, src=last_stage_rank(models.teacher), group=group)
    return {k: v.to(device) for k, v in box[0].items()}


def _teacher_side(models: ScoringModels, tokens: torch.Tensor, mask: torch.Tensor,
                  cfg: DistillConfig) -> tuple[torch.Tensor | None, TeacherTopK | None,
                                               torch.Tensor | None, float]:
    """``(teacher logits on the student's layout or None, top-k or None, log-probs of the
    scored tokens for the sampled loss or None, teacher NLL)`` for this rank's ``tokens``.

    Same layout: the teacher's logits are the student's shards; at PP > 1 they exist on the
    last stage only, where the student's loss is computed (other stages get Nones). Another
    layout: only top-k / log-probs reach the student. A teacher whose group spans several
    student batches (``teacher_batch_group``: teacher TP > student TP, or a teacher pipeline)
    scores all of them at once: tokens are all-gathered over the group, a pipelined teacher's
    last stage broadcasts its outputs to the other stages, and each rank keeps its own rows.
    """
    group = models.teacher_batch_group
    rows = slice(None)
    own = tokens
    if group is not None:
        batch = tokens.shape[0]
        start = dist.get_rank(group) * batch
        rows = slice(start, start + batch)
        tokens = _gather_rows(tokens, group)
        mask = _gather_rows(mask, group, False)
    t_logits = _teacher_forward(models, tokens)
    if t_logits is None and models.same_layout:  # the loss is computed on another stage
        return None, None, None, math.nan
    scores = (None if t_logits is None
              else _teacher_scores(models, t_logits, tokens[:, 1:], mask, cfg))
    if not models.same_layout and models.teacher.pg_collection.pp.size() > 1:
        scores = _from_teacher_last_stage(models, scores, tokens.device)
    n = own.shape[1] - 1  # this rank's prediction positions
    own_rows = {k: v[rows, :n] for k, v in scores.items()}
    teacher_nll = float(-own_rows["nll"].sum() / mask[rows, :n].sum().clamp(min=1))
    top = (TeacherTopK(own_rows["top_logprobs"], own_rows["top_log_tail"],
                       own_rows["top_indices"], cfg.temperature)
           if "top_indices" in own_rows else None)
    # Sharded on another group, only the top-k / log-probs travel.
    return (t_logits if models.same_layout else None), top, own_rows.get("lp"), teacher_nll


def _importance_inputs(batch: SequenceBatch, cfg: DistillConfig,
                       importance: ImportanceCorrection | None) -> dict | None:
    """What the importance correction of ``batch`` needs besides the logits, or None when it
    does not run (no correction configured, dataset tokens, or "none" where the loss needs no
    ratio). Raises ``ValueError`` when it must run and the engine recorded no log-probs."""
    if importance is None or batch.source == "dataset":
        return None
    replayed_sampled = cfg.loss == "sampled" and batch.source == "replay"
    if importance.mode == "none" and not replayed_sampled:
        return None
    if batch.rollout_logprobs is None:
        need = (f"rollout.importance={importance.mode!r}" if importance.mode != "none"
                else 'the "sampled" loss on replayed rollouts (its PPO ratio)')
        raise ValueError(f"{batch.source} batch carries no engine log-probs "
                         f"(SequenceBatch.rollout_logprobs is None) but {need} needs them: use "
                         "an engine that records per-token log-probs"
                         + (", or set rollout.importance='none'" if importance.mode != "none"
                            else ""))
    kind = batch.rollout_logprob_kind or importance.kind
    positions = torch.arange(1, batch.tokens.shape[1])[None, :] - batch.prompt_lengths[:, None]
    banned = (positions < importance.min_new_tokens
              if kind == "sampling" and importance.min_new_tokens and importance.stop_ids
              else None)
    return {"kind": kind, "behaviour": batch.rollout_logprobs[:, 1:], "banned": banned}


def _importance(importance: ImportanceCorrection, inputs: dict, s_logits: torch.Tensor,
                targets: torch.Tensor, mask: torch.Tensor, tp_group: dist.ProcessGroup | None
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(weights w, ratio ρ, stats)`` ``[B, T-1]`` of the scored tokens (1 off the mask)."""
    device = s_logits.device
    banned = inputs["banned"]
    with torch.no_grad():
        logp = sampling_logprobs(
            s_logits.detach(), targets, kind=inputs["kind"], temperature=importance.temperature,
            top_k=importance.top_k, top_p=importance.top_p, banned_ids=importance.stop_ids,
            banned=None if banned is None else banned.to(device), mask=mask, tp_group=tp_group)
        behaviour = inputs["behaviour"].to(device=device, dtype=logp.dtype)
        weights = importance_weights(logp, behaviour, correction=importance.mode,
                                     cap=importance.cap, mask=mask)
        stats = importance_stats(logp, behaviour, weights, mask)
        ratio = torch.where(mask, torch.exp(logp - behaviour), torch.ones_like(logp))
        ratio = ratio.clamp(max=torch.finfo(ratio.dtype).max)  # finite: a PPO ratio value
    return weights, ratio, stats


def score_batch(models: ScoringModels, batch: SequenceBatch, cfg: DistillConfig, *,
                loss_scale: float, anchor_weight: float = 0.0,
                cache: TeacherTopKCache | None = None,
                importance: ImportanceCorrection | None = None) -> ScoreResult:
    """Score ``batch``, backpropagate ``loss · loss_scale`` into the student, return metrics.

    ``importance`` corrects rollout and replayed tokens for the engine's numerics (module
    docstring); None turns the correction off (replayed rollouts of the "sampled" loss then
    take the engine's log-probs as PPO behaviour log-probs directly, at the loss temperature).

    With pipeline parallelism the teacher's and student's logits exist on the last stage only:
    the loss is computed there inside megatron's schedule, and its metrics are broadcast to the
    other stages. Raises :class:`NonFiniteLossError` (on every rank alike) when the loss is
    NaN/inf; the gradients of that batch are then never applied. Raises ``ValueError`` (before
    any model runs) when ``importance`` needs engine log-probs the batch does not carry.
    """
    correction = _importance_inputs(batch, cfg, importance)
    # Batches are built on the host; the models may live on a GPU.
    device = next(models.student.parameters()).device
    tokens = batch.tokens.to(device)
    targets, mask = tokens[:, 1:], batch.loss_mask[:, 1:].to(device)
    s_group = models.student_tp_group
    started = time.perf_counter()
    cached = (cache.load(batch, device) if cache is not None and batch.source == "dataset"
              else None)
    if not _on_all(cached is not None, models.student.pg_collection.pp,
                   models.teacher_lockstep_group):
        cached = None  # one miss runs the teacher's collective forward on all of them
    t_logits = top = teacher_lp = None
    teacher_nll = math.nan
    with torch.no_grad():
        if cached is None:
            t_logits, top, teacher_lp, teacher_nll = _teacher_side(models, tokens, mask, cfg)
            if cache is not None and batch.source == "dataset" and top is not None:
                cache.store(batch, top)
        else:
            top = cached
        anchor_logits = (forward_logits(models.anchor, tokens)
                         if anchor_weight > 0 and models.anchor is not None else None)
    teacher_seconds = time.perf_counter() - started
    common = dict(temperature=cfg.temperature, mask=mask, tp_group=s_group)

    def loss_fn(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        s_logits = logits[:, :-1]
        weights = ratio = None
        stats = dict.fromkeys(_IMPORTANCE_METRICS, math.nan)
        if correction is not None:
            weights, ratio, stats = _importance(importance, correction, s_logits, targets, mask,
                                                s_group)
        # "none" computes the ratio only for the sampled loss's replayed rollouts.
        applied = weights if importance is not None and importance.mode != "none" else None
        if cfg.loss == "full":
            loss = generalized_jsd(s_logits, t_logits, beta=cfg.beta, continuous=cfg.continuous,
                                   weights=applied, **common)
        elif cfg.loss == "topk":
            loss = topk_generalized_jsd(s_logits, top, beta=cfg.beta, continuous=cfg.continuous,
                                        weights=applied, **common)
        elif batch.source == "replay" and correction is not None:
            # An older student sampled these: the (corrected) ratio to μ is the PPO ratio.
            loss = sampled_token_reverse_kl(
                s_logits, targets, teacher_lp, None, clip_ratio=cfg.clip_ratio or None,
                behaviour_ratio=ratio if applied is None else applied, **common).loss
        else:
            behaviour = (batch.rollout_logprobs[:, 1:].to(device)
                         if batch.source == "replay" and importance is None else None)
            loss = sampled_token_reverse_kl(s_logits, targets, teacher_lp, behaviour,
                                            clip_ratio=cfg.clip_ratio or None, weights=applied,
                                            **common).loss
        total, anchor_kl = loss, 0.0
        if anchor_logits is not None:
            anchor = generalized_jsd(s_logits, anchor_logits[:, :-1], beta=1.0, mask=mask,
                                     tp_group=s_group)
            anchor_kl = float(anchor.detach())
            total = loss + anchor_weight * anchor
        with torch.no_grad():
            detached = s_logits.detach()
            if t_logits is not None:
                fkl, rkl = (generalized_jsd(detached, t_logits, beta=b, **common)
                            for b in (0.0, 1.0))
            else:
                fkl, rkl = (topk_generalized_jsd(detached, top, beta=b, **common)
                            for b in (0.0, 1.0))
        metrics = {"loss": float(loss.detach()), "total": float(total.detach()),
                   "forward_kl": float(fkl), "reverse_kl": float(rkl), "anchor_kl": anchor_kl,
                   "teacher_nll": teacher_nll,
                   **{f"importance_{k}": v for k, v in stats.items()}}
        return total * loss_scale, metrics

    started = time.perf_counter()
    metrics = _from_last_stage(models.student, forward_backward(models.student, tokens, loss_fn))
    student_seconds = time.perf_counter() - started
    stop_if_nonfinite(metrics["total"], f"{batch.source} batch loss")
    return ScoreResult(metrics["loss"], metrics["forward_kl"], metrics["reverse_kl"],
                       metrics["teacher_nll"], metrics["anchor_kl"], int(mask.sum()),
                       teacher_seconds, student_seconds, teacher_cache_hit=cached is not None,
                       **{f"importance_{k}": metrics[f"importance_{k}"]
                          for k in _IMPORTANCE_METRICS})


def _on_all(flag: bool, *groups: dist.ProcessGroup | None) -> bool:
    """``flag`` and-ed over all ranks when any of ``groups`` spans several (as-is otherwise).
    All ranks, not each group in turn: chained groups (a stage's partner in the teacher's
    layout, that one's own stages, ...) would otherwise need several rounds to agree."""
    if all(g is None or g.size() == 1 for g in groups):
        return flag
    value = torch.tensor([int(flag)], device=runtime_device())  # NCCL: tensors on the GPU
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


_IMPORTANCE_METRICS = ("kl", "ratio_min", "ratio_mean", "ratio_max", "masked_fraction")
"""The keys of :func:`~nemo_opd.loss.importance_stats` (``ScoreResult.importance_*``)."""

_METRICS = ("loss", "total", "forward_kl", "reverse_kl", "anchor_kl", "teacher_nll",
            *(f"importance_{k}" for k in _IMPORTANCE_METRICS))


def _from_last_stage(model: torch.nn.Module, metrics: dict[str, float] | None
                     ) -> dict[str, float]:
    """The last pipeline stage's ``metrics`` on every stage (as-is at PP=1)."""
    group = model.pg_collection.pp
    if group.size() == 1:
        return metrics
    values = torch.tensor([metrics[k] for k in _METRICS] if metrics is not None
                          else [0.0] * len(_METRICS), dtype=torch.float64,
                          device=runtime_device())
    dist.broadcast(values, src=last_stage_rank(model), group=group)
    return dict(zip(_METRICS, values.tolist(), strict=True))


def stop_if_nonfinite(value: float, what: str) -> None:
    """Raise on every rank if ``value`` is NaN/inf on any rank (ranks must stop together)."""
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=runtime_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise NonFiniteLossError(f"{what} is {value} on this rank (non-finite on at least one "
                                 "rank)")
