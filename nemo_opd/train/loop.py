"""The training loop and the recipe's entry point, :func:`run_distillation`.

One optimizer step::

    lr(step) → for each micro batch: plan (strategy) → sequences (dataset / rollouts / replay)
             → score_batch (teacher no-grad, student fwd+bwd)
    → finalize grads (megatron DDP: fp32 buffers, DP mean, TP-partial sums) → global grad norm
    → stop if non-finite → clip → AdamW on fp32 masters (nemo_opd.train.optim)
    → metrics → checkpoint (every N steps, atomically) → evaluation hook (every N steps)

Preemption: with ``should_stop`` (e.g. a :class:`~nemo_opd.train.preemption.PreemptionFlag`)
the flag is combined over all ranks after every optimizer step; when any rank's is set, every
rank saves a checkpoint at that step and returns a result with ``preempted=True``.

Exact resume: everything random is either keyed on ``(seed, step, micro batch)`` (λ draws,
sampling seeds, replay picks, data order per epoch) or restored from the checkpoint (RNG
states, data position, replay buffer, AdamW moments and step counts, weights, quantizer state),
so a resumed run produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_opd.config import RunConfig
from nemo_opd.data import EpochBatches, Example, ReplayBuffer, SequenceBatch, step_rng
from nemo_opd.rollout.engine import RolloutBatch, RolloutEngine
from nemo_opd.rollout.factory import check_engine, check_rollout_setup, make_engine
from nemo_opd.rollout.teacher_seeded import TeacherSeededRollouts
from nemo_opd.runtime import distributed_runtime, runtime_device, seed_all
from nemo_opd.strategies import PlanPart, StepPlan, Strategy, TeacherContext, build_strategy
from nemo_opd.train import checkpoint as ckpt
from nemo_opd.train import setup
from nemo_opd.train.divergence import DivergenceError, DivergenceGuard
from nemo_opd.train.metrics import MetricsLogger
from nemo_opd.train.optim import build_optimizer, data_parallel_group
from nemo_opd.train.step import (
    ImportanceCorrection,
    NonFiniteLossError,
    ScoreResult,
    ScoringModels,
    TeacherTopKCache,
    score_batch,
    stop_if_nonfinite,
)

__all__ = ["EvalHook", "TrainResult", "Trainer", "run_distillation"]

logger = logging.getLogger(__name__)

EvalHook = Callable[[torch.nn.Module, int], "Mapping[str, float] | None"]
"""``hook(student, steps_done) -> metrics``; called on every rank under ``no_grad`` (it may run
collectives); rank 0 logs what it returns."""


@dataclasses.dataclass
class TrainResult:
    """What a run produced."""

    steps_done: int
    """Optimizer steps completed (including those before a resume)."""
    history: list[dict[str, Any]]
    """This process's per-step metrics (steps run in this call only)."""
    evaluations: list[dict[str, Any]]
    """``{"step": s, **metrics}`` per evaluation-hook call."""
    last_checkpoint: Path | None
    """The newest complete checkpoint (None if saving never happened)."""
    metrics_file: Path | None
    """The JSONL file (rank 0 with logging.jsonl), else None."""
    output_dir: Path
    preempted: bool = False
    """``should_stop`` asked to stop: training ended early at ``steps_done`` with a checkpoint
    saved there (the evaluation hook of that step did not run); a rerun resumes from it."""


class Trainer:
    """Owns models, optimizer, data, strategy and engines of one run (see the module docstring).

    Args:
        cfg: the run.
        engine_factory: ``factory(model, tp_group) -> RolloutEngine`` for the student and, with
            teacher-seeded rollouts, the teacher; default: the engine ``cfg.rollout.engine``
            names for the student (:func:`~nemo_opd.rollout.make_engine`) and the colocated
            megatron engine for the teacher.
        eval_hook: see :data:`EvalHook`.
    """

    def __init__(self, cfg: RunConfig, *,
                 engine_factory: Callable[[torch.nn.Module, Any], RolloutEngine] | None = None,
                 eval_hook: EvalHook | None = None) -> None:
        self.cfg = cfg
        self.eval_hook = eval_hook
        # Everything built below (LoRA adapters, random shells) draws from seeded generators, so
        # two runs of one config in one process build the same models.
        seed_all(cfg.seed)
        self.total_steps = cfg.total_steps
        self.rank = dist.get_rank()
        self.strategy: Strategy = build_strategy(cfg.distill, seed=cfg.seed)
        self.divergence = DivergenceGuard(cfg.optim.divergence_factor)
        # Files first: data, tokenizers and vocab sizes are checked before any weight loads.
        self.tokenizer = setup.load_tokenizer(cfg.model.tokenizer_path)
        self.examples, self.encoder = setup.load_examples(cfg, self.tokenizer)
        sample_texts = [self.tokenizer.decode(e.prompt_ids) for e in self.examples[:8]]
        setup.check_models(cfg, dist.get_world_size(), self.tokenizer, sample_texts)
        check_rollout_setup(cfg)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.tokenizer.eos_token_id)
        self.eos_id = self.tokenizer.eos_token_id

        self.dp_group = data_parallel_group()
        self.student_tp_group = parallel_state.get_tensor_model_parallel_group()
        self.batches = EpochBatches(
            self.examples, cfg.optim.micro_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size())
        self.replay = (ReplayBuffer(cfg.distill.strategy.replay_capacity, seed=cfg.seed)
                       if self.strategy.name == "replay_buffer" else None)

        teacher_pg, teacher_tp_group = setup.teacher_groups(cfg)
        teacher = setup.build_teacher(cfg, teacher_pg)
        calibration = setup.calibration_batches(cfg, self.examples, self.pad_id)
        anchor = None
        if self.strategy.needs_anchor:  # the initial student, rebuilt identically on resume
            anchor = setup.build_student(cfg, calibration)
            anchor.eval()
            anchor.requires_grad_(False)
        self.start_step = 0
        ckpt.remove_partial_saves(cfg.checkpoint_dir)  # left by saves a crash interrupted
        # Verifying (hashing) is only worth it when the checkpoint will be loaded.
        self.last_checkpoint = ckpt.latest_checkpoint(cfg.checkpoint_dir,
                                                      verify=cfg.checkpoint.resume)
        if cfg.checkpoint.resume and self.last_checkpoint is not None:
            student, self.optim, state, meta = ckpt.load_checkpoint(
                self.last_checkpoint, setup.build_fresh_student_shell(cfg),
                lambda m: build_optimizer(m, cfg.optim, self.total_steps))
            _check_resumable(cfg, meta, self.last_checkpoint)
            self.start_step = int(state["step"])
            self.batches.load_state_dict(state["data"])
            if self.replay is not None:
                self.replay.load_state_dict(state["replay"])
            ckpt.set_rng_state(state["rng"])
        else:
            student = setup.build_student(cfg, calibration)
            self.optim = build_optimizer(student, cfg.optim, self.total_steps)
        student.train()
        context = (tuple(self.encoder.text_ids(cfg.distill.teacher_context))
                   if cfg.distill.teacher_context else ())
        self.models = ScoringModels(
            student=student, teacher=teacher, student_tp_group=self.student_tp_group,
            teacher_tp_group=teacher_tp_group,
            same_layout=cfg.model.teacher_parallel == cfg.model.student_parallel,
            teacher_context=TeacherContext(context), anchor=anchor,
            teacher_batch_group=_teacher_batch_group(cfg, teacher_pg, teacher_tp_group),
            teacher_lockstep_group=teacher_pg.tp_ep_pp if teacher_pg is not None else None)
        self.cache = (TeacherTopKCache(cfg.distill.teacher_cache_dir, cfg.distill.topk,
                                       cfg.distill.temperature)
                      if cfg.distill.teacher_cache_dir else None)
        ids = dict(pad_id=self.pad_id, eos_id=self.eos_id)
        self._engine_factory = engine_factory or functools.partial(make_engine, cfg, **ids)
        self._teacher_engine_factory = engine_factory or functools.partial(
            make_engine, cfg, role="teacher", **ids)
        self._engine: RolloutEngine | None = None
        self.importance = ImportanceCorrection.from_config(cfg.rollout, cfg.sampling, self.eos_id)
        if cfg.needs_rollouts:  # built now: an engine that cannot serve fails before step 0
            check_engine(self._engine_for_student(), student, self.tokenizer, cfg)
        self._seeded: TeacherSeededRollouts | None = None
        self._rollout_stats: list[tuple[int, float, float, float]] = []
        """Per rollout call of the current step: (generated tokens, seconds, mean response
        length, mean teacher-prefix length)."""

    # ---------------------------------------------------------------- sequences

    def _engine_for_student(self) -> RolloutEngine:
        if self._engine is None:
            self._engine = self._engine_factory(self.models.student, self.student_tp_group)
        return self._engine

    def _sampling_seed(self, step: int, call: int) -> int:
        # Keyed on the data-parallel rank too: DP ranks hold different prompts anyway, and TP
        # ranks of one group must draw the same tokens.
        dp_rank = parallel_state.get_data_parallel_rank()
        return step_rng(self.cfg.seed, step, call, f"sample/{dp_rank}").randrange(2**31)

    def _generate(self, prompts: list[list[int]], step: int, call: int) -> RolloutBatch:
        """One engine call (the teacher-seeded pair of engines for that strategy)."""
        params = dataclasses.replace(self.cfg.sampling, seed=self._sampling_seed(step, call))
        if self.strategy.name != "teacher_seeded":
            return self._engine_for_student().generate(prompts, params)
        if self._seeded is None:
            strategy = self.cfg.distill.strategy
            teacher_engine = self._teacher_engine_factory(self.models.teacher,
                                                          self.models.teacher_tp_group)
            self._seeded = TeacherSeededRollouts(
                self._engine_for_student(), teacher_engine, self.strategy.prefix_schedule,
                loss_tokens="all" if strategy.seed_prefix_loss else "student")
        return self._seeded.generate(prompts, params, step=step)

    def _rollout_rows(self, prompts: list[list[int]], step: int) -> list[dict[str, Any]]:
        """Rollouts of every prompt of the step (``n`` rows each, in prompt order), from engine
        calls of ``rollout.batch_size`` prompts (all at once when 0), as unpadded rows."""
        size = self.cfg.rollout.batch_size or len(prompts)
        rows: list[dict[str, Any]] = []
        for call, start in enumerate(range(0, len(prompts), size)):
            rollout = self._generate(prompts[start:start + size], step, call)
            self._rollout_stats.append((rollout.num_generated_tokens, rollout.generation_seconds,
                                        float(rollout.response_lengths.float().mean()),
                                        float(rollout.prefix_lengths.float().mean())))
            rows += SequenceBatch.from_rollout(rollout).rows()
        return rows

    def _step_sequences(self, examples: list[list[Example]], plans: list[StepPlan], step: int
                        ) -> dict[tuple[int, int], SequenceBatch]:
        """The sequences of every (micro batch, part) of the step.

        Dataset parts are the examples' responses; replay parts come from the buffer (as it was
        before this step's rollouts) when it holds enough; every other part's rollouts are
        generated together, decoupled from the micro-batch size (:meth:`_rollout_rows`), then
        split back into the micro batches and added to the replay buffer in that order.
        """
        out: dict[tuple[int, int], SequenceBatch] = {}
        fresh: list[tuple[int, int]] = []
        for micro, (batch, plan) in enumerate(zip(examples, plans, strict=True)):
            for index, part in enumerate(plan.parts):
                if part.source == "dataset":
                    out[micro, index] = SequenceBatch.from_examples(batch, self.pad_id)
                elif part.source == "replay" and (
                        replayed := self._replayed(len(batch), step, micro)) is not None:
                    out[micro, index] = replayed
                else:
                    fresh.append((micro, index))
        prompts = [list(e.prompt_ids) for micro, _ in fresh for e in examples[micro]]
        rows = self._rollout_rows(prompts, step) if prompts else []
        n = self.cfg.sampling.n
        for micro, index in fresh:
            count = len(examples[micro]) * n
            out[micro, index] = SequenceBatch.from_rows(rows[:count], self.pad_id, "rollout")
            rows = rows[count:]
            if self.replay is not None:
                self.replay.add(out[micro, index])
        return out

    def _replayed(self, prompts: int, step: int, micro: int) -> SequenceBatch | None:
        rows = prompts * self.cfg.sampling.n
        replayed = self.replay.sample(rows, self.pad_id, step=step, micro_batch=micro)
        if replayed is None:
            logger.info("step %d: replay buffer holds %d < %d sequences; fresh rollouts instead",
                        step, len(self.replay), rows)
        return replayed

    # ---------------------------------------------------------------- one step

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimizer step ``step`` (0-based); return its metrics."""
        cfg, accumulation = self.cfg, self.cfg.optim.grad_accumulation
        self.optim.begin_step(step)
        lr, grad_scale = self.optim.lr, self.optim.loss_scale()
        started = time.perf_counter()
        self._rollout_stats = []
        results: list[tuple[PlanPart, ScoreResult]] = []
        sources: list[str] = []
        plans = [self.strategy.plan(step, micro) for micro in range(accumulation)]
        examples = [self.batches.next_batch() for _ in plans]
        try:
            sequences = self._step_sequences(examples, plans, step)
        except FloatingPointError as err:  # non-finite logits while sampling
            raise self._stopped(step, NonFiniteLossError(str(err)), "rollouts") from None
        last = (accumulation - 1, len(plans[-1].parts) - 1)
        for micro, plan in enumerate(plans):
            for index, part in enumerate(plan.parts):
                batch = sequences[micro, index]
                sources.append(batch.source)
                try:
                    # Only the last backward of the step may start the DP gradient reduction.
                    with self.optim.grad_sync((micro, index) == last):
                        result = score_batch(self.models, batch, cfg.distill,
                                             loss_scale=part.weight / accumulation * grad_scale,
                                             anchor_weight=plan.anchor_weight, cache=self.cache,
                                             importance=self.importance)
                except NonFiniteLossError as err:
                    raise self._stopped(step, err, f"micro batch {micro}") from None
                results.append((part, result))
        optim_started = time.perf_counter()
        grad_norm = self.optim.finish_gradients()
        if grad_norm is None:  # fp16 overflow: megatron's rule is to skip the step
            logger.warning("step %d: fp16 gradient overflow, step skipped; loss scale now %g",
                           step, self.optim.loss_scale())
            grad_norm = math.nan
        else:
            try:
                stop_if_nonfinite(grad_norm, "gradient norm")
            except NonFiniteLossError as err:
                raise self._stopped(step, err) from None
            self.optim.apply()
            if self._engine is not None:  # an external engine samples the next step's rollouts
                self._engine.update_weights(self.models.student)
        optim_seconds = time.perf_counter() - optim_started
        return self._step_metrics(results, sources, lr, grad_norm, optim_seconds,
                                  time.perf_counter() - started)

    def _step_metrics(self, results: list[tuple[PlanPart, ScoreResult]], sources: list[str],
                      lr: float, grad_norm: float, optim_seconds: float, seconds: float
                      ) -> dict[str, Any]:
        accumulation = self.cfg.optim.grad_accumulation

        def mean(attr: str) -> float:
            values = [getattr(r, attr) for _, r in results if not math.isnan(getattr(r, attr))]
            return sum(values) / len(values) if values else math.nan

        def extreme(attr: str, pick: Callable[[list[float]], float]) -> float:
            values = [getattr(r, attr) for _, r in results if not math.isnan(getattr(r, attr))]
            return pick(values) if values else math.nan

        generated = sum(s[0] for s in self._rollout_stats)
        rollout_seconds = sum(s[1] for s in self._rollout_stats)
        metrics = {
            "loss": sum(p.weight * r.loss for p, r in results) / accumulation,
            "forward_kl": mean("forward_kl"), "reverse_kl": mean("reverse_kl"),
            "teacher_nll": mean("teacher_nll"), "anchor_kl": mean("anchor_kl"),
            "loss_tokens": sum(r.loss_tokens for _, r in results),
            "sources": sources,
            "on_policy_fraction": sum(s != "dataset" for s in sources) / len(sources),
            "rollout_length": (sum(s[2] for s in self._rollout_stats) / len(self._rollout_stats)
                               if self._rollout_stats else 0.0),
            "teacher_prefix_length": (sum(s[3] for s in self._rollout_stats)
                                      / len(self._rollout_stats) if self._rollout_stats else 0.0),
            "rollout_tokens_per_s": generated / rollout_seconds if rollout_seconds else 0.0,
            "time_rollout_s": rollout_seconds,
            "time_teacher_s": sum(r.teacher_seconds for _, r in results),
            "time_student_s": sum(r.student_seconds for _, r in results),
            "time_optimizer_s": optim_seconds, "step_seconds": seconds,
            "lr": lr, "grad_norm": grad_norm,
            "teacher_cache_hits": sum(r.teacher_cache_hit for _, r in results),
            # Engine vs trainer on the step's rollout tokens (NaN, logged as None, without any).
            "importance_kl": mean("importance_kl"),
            "importance_ratio_min": extreme("importance_ratio_min", min),
            "importance_ratio_mean": mean("importance_ratio_mean"),
            "importance_ratio_max": extreme("importance_ratio_max", max),
            "importance_masked_fraction": mean("importance_masked_fraction"),
        }
        self._average_over_data_parallel(metrics)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in metrics.items()}

    _DP_MEAN = ("loss", "forward_kl", "reverse_kl", "teacher_nll", "anchor_kl", "importance_kl",
                "importance_ratio_mean", "importance_masked_fraction")
    _DP_SUM = ("loss_tokens",)
    _DP_EXTREMES = (("importance_ratio_min", dist.ReduceOp.MIN),
                    ("importance_ratio_max", dist.ReduceOp.MAX))

    def _average_over_data_parallel(self, metrics: dict[str, Any]) -> None:
        """Report the step's loss and divergences over the whole global batch: means over the
        data-parallel ranks (each rank's value is already identical over TP), token counts
        summed, importance ratio extremes taken over all ranks (every DP rank plans the same
        sources, so a metric is NaN on all ranks or on none). Timings stay this rank's."""
        if self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return
        keys = self._DP_MEAN + self._DP_SUM
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                              device=runtime_device())  # NCCL reduces GPU tensors only
        dist.all_reduce(values, group=self.dp_group)
        size = dist.get_world_size(self.dp_group)
        for key, value in zip(keys, values.tolist(), strict=True):
            metrics[key] = value / size if key in self._DP_MEAN else int(value)
        for key, op in self._DP_EXTREMES:
            value = torch.tensor([float(metrics[key])], dtype=torch.float64,
                                 device=runtime_device())
            dist.all_reduce(value, op=op, group=self.dp_group)
            metrics[key] = float(value.item())

    def _stopped(self, step: int, err: DivergenceError, where: str = "") -> DivergenceError:
        """``err`` (same class) with the step, its place and the checkpoint to resume from."""
        last = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was saved yet")
        detail = f"{err} ({where})" if where else str(err)
        message = (f"training stopped at step {step}: {detail}; nothing was saved for this "
                   f"step and {last}. Lower optim.lr, enable optim.grad_clip or check the data.")
        logger.error(message)
        return type(err)(message)

    # ---------------------------------------------------------------- checkpoints

    def save(self, steps_done: int) -> Path:
        state = {"step": steps_done, "rng": ckpt.rng_state(), "data": self.batches.state_dict(),
                 "replay": self.replay.state_dict() if self.replay is not None else None}
        meta = {"world_size": dist.get_world_size(), "total_steps": self.total_steps,
                "config": self.cfg.to_dict()}
        self.last_checkpoint = ckpt.save_checkpoint(
            self.cfg.checkpoint_dir, steps_done, self.models.student, self.optim, state,
            meta, keep_last=self.cfg.checkpoint.keep_last)
        return self.last_checkpoint

    def _stop_requested(self, should_stop: Callable[[], bool]) -> bool:
        """``should_stop()`` of any rank, on every rank (all-reduce MAX on the default group)."""
        device = next(self.models.student.parameters()).device
        flag = torch.tensor([1 if should_stop() else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ---------------------------------------------------------------- loop

    def train(self, *, stop_after: int | None = None,
              should_stop: Callable[[], bool] | None = None) -> TrainResult:
        """Train from the current step to the end (or until ``stop_after`` steps are done in
        total, e.g. a job's time slot; a later run resumes from the checkpoint saved then).

        ``should_stop`` (pass it on every rank or on none: it adds one collective per step) is
        asked after every optimizer step; once it returns True on any rank, all ranks save a
        checkpoint at that step and return with ``preempted=True``."""
        cfg = self.cfg
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        sink = MetricsLogger(cfg, rank=self.rank, total_steps=self.total_steps,
                             start_step=self.start_step)
        history: list[dict[str, Any]] = []
        evaluations: list[dict[str, Any]] = []
        steps_done, preempted = max(end, self.start_step), False
        try:
            for step in range(self.start_step, end):
                try:
                    metrics = self.train_step(step)
                    try:  # before this step's checkpoint: a diverged state is never saved
                        self.divergence.check(step, metrics)
                    except DivergenceError as err:
                        raise self._stopped(step, err) from None
                except DivergenceError as err:
                    sink.log_event(step, "divergence_stop", {"message": str(err)})
                    raise
                done = step + 1
                history.append({"step": done, **metrics})
                sink.log(done, metrics)
                preempted = should_stop is not None and self._stop_requested(should_stop)
                every = cfg.checkpoint.save_every
                if (every and done % every == 0) or done == end or preempted:
                    self.save(done)
                if preempted:
                    steps_done = done
                    if self.rank == 0:
                        logger.warning("preempted: stopping after step %d of %d; checkpoint %s "
                                       "saved", done, self.total_steps, self.last_checkpoint)
                    sink.log_event(done, "preempted", {"checkpoint": str(self.last_checkpoint)})
                    break
                if self.eval_hook is not None and (
                        (cfg.eval_every and done % cfg.eval_every == 0) or done == end):
                    with torch.no_grad():
                        result = dict(self.eval_hook(self.models.student, done) or {})
                    self.models.student.train()
                    evaluations.append({"step": done, **result})
                    sink.log_event(done, "eval", result)
        finally:
            sink.close()
        return TrainResult(steps_done=steps_done, history=history,
                           evaluations=evaluations, last_checkpoint=self.last_checkpoint,
                           metrics_file=sink.jsonl_path, output_dir=Path(cfg.output_dir),
                           preempted=preempted)


def _teacher_batch_group(cfg: RunConfig, teacher_pg: Any, teacher_tp_group: Any) -> Any:
    """The group whose student batches one teacher forward scores together (None: each rank
    its own): a teacher pipeline on another layout than the student's takes its whole
    model-parallel group (its first stage must see every batch its last stage answers for);
    a larger teacher TP group its TP group."""
    teacher, student = cfg.model.teacher_parallel, cfg.model.student_parallel
    if teacher == student:
        return None
    if teacher.pipeline_model_parallel_size > 1:
        return teacher_pg.mp
    if teacher.tensor_model_parallel_size > student.tensor_model_parallel_size:
        return teacher_tp_group
    return None


_RESUME_MUST_MATCH = ("model", "quant", "distill", "data", "seed")
"""Config sections a checkpoint's run and the resuming run must share (the rest, e.g. logging
or the step count, may change between attempts)."""


def _check_resumable(cfg: RunConfig, meta: dict[str, Any], path: Path) -> None:
    """Raise if ``path`` was written by a run whose model, quantization, objective, data or
    seed differ: resuming it would silently continue another experiment."""
    saved = meta.get("config", {})
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples → lists, as stored
    differ = [key for key in _RESUME_MUST_MATCH if saved.get(key) != current[key]]
    if differ:
        raise ValueError(f"checkpoint {path} was written by a run with different "
                         f"{', '.join(differ)} settings; point checkpoint.dir elsewhere or set "
                         "checkpoint.resume=false")
    if saved.get("optim", {}).get("steps") != cfg.optim.steps:
        logger.warning("resuming %s with optim.steps=%d (was %s): the learning-rate schedule "
                       "changes from here", path, cfg.optim.steps, saved.get("optim", {}).get(
                           "steps"))


def run_distillation(cfg: RunConfig, *, eval_hook: EvalHook | None = None,
                     stop_after: int | None = None,
                     engine_factory: Callable[[torch.nn.Module, Any], RolloutEngine] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Build student (HF weights → ModelOpt QAT) and teacher from ``cfg``, train, save, return.

    Runs inside an existing nemo_opd runtime (its layout must be the student's) or brings one
    up for the call (torchrun's environment, or a world of one) and tears it down after.

    Args:
        cfg: the whole run (checked on construction).
        eval_hook: evaluation every ``cfg.eval_every`` steps and at the end (:data:`EvalHook`).
        stop_after: stop once this many steps are done in total (checkpoint saved there).
        engine_factory: replaces the default colocated megatron rollout engine.
        should_stop: asked after every optimizer step (on every rank; any rank's True counts):
            save a checkpoint there and return with ``preempted=True`` (e.g. a
            :class:`~nemo_opd.train.preemption.PreemptionFlag` on SLURM's signals).

    Raises:
        ValueError: bad data, teacher/student vocabulary disagreement, unsupported options
            (before any weight is loaded where possible).
        NonFiniteLossError: a NaN/inf loss or gradient norm (nothing saved for that step; the
            previous checkpoint is intact).
    """
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        wanted = cfg.model.student_parallel.tensor_model_parallel_size
        if tp != wanted:
            raise ValueError(f"the running runtime has TP={tp} but ModelConfig.student_parallel "
                             f"asks for TP={wanted}")
        trainer = Trainer(cfg, engine_factory=engine_factory, eval_hook=eval_hook)
        return trainer.train(stop_after=stop_after, should_stop=should_stop)
    with distributed_runtime(cfg.model.student_parallel, seed=cfg.seed):
        trainer = Trainer(cfg, engine_factory=engine_factory, eval_hook=eval_hook)
        return trainer.train(stop_after=stop_after, should_stop=should_stop)
