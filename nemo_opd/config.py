"""One typed tree for a whole distillation run: :class:`RunConfig`.

Every node is a frozen dataclass of plain types (str, int, float, bool, tuples of those), so the
recipe can expose each field as a dotted NeMo-Run / Hydra override (``distill.beta=0.5``,
``optim.lr=1e-5``). Each node checks its own fields in ``__post_init__`` and :class:`RunConfig`
checks the combinations, so a bad value raises ``ValueError`` naming the field and the value
before any model is loaded.

Paths derived from ``RunConfig.output_dir`` (checkpoints, metrics.jsonl, tensorboard/) are
resolved by the properties of :class:`RunConfig`, not stored twice.
"""


import dataclasses
import math
from pathlib import Path
from typing import Any

from nemo_opd.quant.formats import FORMATS
from nemo_opd.rollout.engine import SamplingParams
from nemo_opd.runtime import ParallelConfig

__all__ = [
    "DTYPES",
    "LOSS_KINDS",
    "RECOMPUTE_GRANULARITIES",
    "RECOMPUTE_METHODS",
    "OVERLONG_POLICIES",
    "ROLLOUT_ENGINES",
    "IMPORTANCE_CORRECTIONS",
    "STRATEGIES",
    "CheckpointConfig",
    "DataConfig",
    "DistillConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "QuantConfig",
    "RolloutConfig",
    "RunConfig",
    "StrategyConfig",
]

DTYPES = ("float32", "bfloat16", "float16")
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
LOSS_KINDS = ("full", "topk", "sampled")
OVERLONG_POLICIES = ("truncate_left", "drop", "error")
ROLLOUT_ENGINES = ("megatron", "hf", "trtllm", "vllm")
IMPORTANCE_CORRECTIONS = ("truncate", "mask", "none")
STRATEGIES = ("on_policy_gkd", "hybrid", "extended_on_policy", "teacher_seeded", "mixture",
              "replay_buffer", "kl_anchored", "reverse_curriculum")


def _fail(node: object, field: str, rule: str) -> None:
    raise ValueError(f"{type(node).__name__}.{field} must be {rule}, got "
                     f"{getattr(node, field)!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_ints(node: object, minimum: int, *fields: str) -> None:
    for field in fields:
        if not _is_int(getattr(node, field)) or getattr(node, field) < minimum:
            _fail(node, field, f"an int >= {minimum}")


def _check_choice(node: object, field: str, choices: tuple[str, ...]) -> None:
    if getattr(node, field) not in choices:
        _fail(node, field, f"one of {choices}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which models, on which parallel layouts, in which dtypes."""

    student: str = ""
    """HF model directory of the full-precision model to quantize and train (required)."""
    teacher: str = ""
    """HF model directory of the frozen teacher; "" = self-distillation: the teacher is the
    student's own original full-precision weights (seed 003 §4)."""
    tokenizer: str = ""
    """Tokenizer directory (or hub name); "" = the student's directory."""
    student_parallel: ParallelConfig = ParallelConfig()
    """The student's TP/PP layout (the global megatron layout of the job)."""
    teacher_parallel: ParallelConfig = ParallelConfig()
    """The teacher's TP/PP/EP layout; its TP size and the student's must divide one another. On
    another layout than the student's, a larger teacher TP group or a teacher pipeline scores
    the batches of all student ranks it spans in one forward, and only the teacher's top-k /
    log-probs reach the student (distill.loss "topk" or "sampled"). An MoE teacher may split its
    experts over ``expert_model_parallel_size`` data-parallel ranks; the student stays dense."""
    student_dtype: str = "float32"
    """Student parameter dtype, one of :data:`DTYPES` (bf16 on GPU, fp32 on CPU)."""
    teacher_dtype: str = "float32"
    """Teacher parameter dtype, one of :data:`DTYPES`."""
    recompute_granularity: str = "none"
    """Student activation recompute (megatron-core ``recompute_granularity``): "none",
    "selective" (the attention core only) or "full" (whole layers, see ``recompute_method``).
    The teacher runs forward only and keeps no activations."""
    recompute_method: str = "uniform"
    """With "full" recompute: "uniform" checkpoints every ``recompute_num_layers`` layers,
    "block" recomputes the first ``recompute_num_layers`` layers of each pipeline stage."""
    recompute_num_layers: int = 1
    """Layers per recompute group ("uniform") or recomputed layers per stage ("block"); >= 1."""

    def __post_init__(self) -> None:
        if not isinstance(self.student, str) or not self.student:
            _fail(self, "student", "a non-empty path to an HF model directory")
        for field in ("teacher", "tokenizer"):
            if not isinstance(getattr(self, field), str):
                _fail(self, field, "a string")
        for field in ("student_parallel", "teacher_parallel"):
            if not isinstance(getattr(self, field), ParallelConfig):
                _fail(self, field, "a nemo_opd.runtime.ParallelConfig")
        if self.student_parallel.expert_model_parallel_size != 1:
            _fail(self, "student_parallel",
                  "expert_model_parallel_size = 1: the student is a dense model (expert "
                  "parallelism is for an MoE teacher, in teacher_parallel)")
        for field in ("student_dtype", "teacher_dtype"):
            _check_choice(self, field, DTYPES)
        _check_choice(self, "recompute_granularity", RECOMPUTE_GRANULARITIES)
        _check_choice(self, "recompute_method", RECOMPUTE_METHODS)
        _check_ints(self, 1, "recompute_num_layers")

    @property
    def self_distillation(self) -> bool:
        """True when the teacher is the student's original weights."""
        return not self.teacher or Path(self.teacher) == Path(self.student)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.student


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the student is quantized (ModelOpt QAT)."""

    format: str = "int4"
    """A name from :data:`nemo_opd.quant.formats.FORMATS`, or "none" (full-precision student)."""
    calibration_batches: int = 4
    """Micro batches of training prompts used for PTQ calibration before training (>= 0)."""
    lora: bool = False
    """Train LoRA adapters on the frozen quantized base instead of the full weights."""
    lora_r: int = 32
    """LoRA rank (>= 1)."""
    lora_alpha: float = 64.0
    """LoRA scaling numerator (update = alpha / r · B A); > 0."""

    def __post_init__(self) -> None:
        _check_choice(self, "format", ("none", *FORMATS))
        _check_ints(self, 0, "calibration_batches")
        _check_ints(self, 1, "lora_r")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            _fail(self, "lora_alpha", "a finite number > 0")


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """Which seed-004 schedule decides each step's data and loss (see nemo_opd.strategies)."""

    name: str = "on_policy_gkd"
    """One of :data:`STRATEGIES`."""
    switch_step: int = 50
    """hybrid: off-policy before this step, on-policy from it; reverse_curriculum: on-policy
    before it, off-policy from it (>= 0)."""
    mixture_weight: float = 0.3
    """mixture: loss = w · off-policy loss + (1 − w) · on-policy loss, w in [0, 1]."""
    anchor_weight: float = 0.1
    """kl_anchored: γ in loss + γ · KL(student ‖ initial student) (>= 0)."""
    replay_capacity: int = 256
    """replay_buffer: most rollout sequences kept (oldest evicted first; >= 1)."""
    replay_every: int = 4
    """replay_buffer: every this-many steps (>= 2) the batch is drawn from the buffer (older
    student rollouts, scored afresh by the teacher) instead of fresh rollouts."""
    seed_tokens: int = 20
    """teacher_seeded: teacher-written tokens before the student continues, at step 0 (>= 0)."""
    seed_decay_steps: int = 50
    """teacher_seeded: steps over which the teacher prefix decays linearly to 0 (>= 1)."""
    seed_prefix_loss: bool = False
    """teacher_seeded: also put loss on the teacher-written prefix tokens (default: only the
    student's own tokens carry loss)."""
    extended_factor: int = 2
    """extended_on_policy: train this many times ``optim.steps`` (seed 004: 2 → 200 steps)."""

    def __post_init__(self) -> None:
        _check_choice(self, "name", STRATEGIES)
        _check_ints(self, 0, "switch_step", "seed_tokens")
        _check_ints(self, 1, "replay_capacity", "seed_decay_steps", "extended_factor")
        _check_ints(self, 2, "replay_every")
        if not _is_number(self.mixture_weight) or not 0 <= self.mixture_weight <= 1:
            _fail(self, "mixture_weight", "a number in [0, 1]")
        if not _is_number(self.anchor_weight) or self.anchor_weight < 0:
            _fail(self, "anchor_weight", "a finite number >= 0")
        if not isinstance(self.seed_prefix_loss, bool):
            _fail(self, "seed_prefix_loss", "a bool")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The distillation objective (ARCHITECTURE.md "Definitions")."""

    beta: float = 1.0
    """Generalized-JSD interpolation: 0 forward KL(T‖S), 1 reverse KL(S‖T); in [0, 1]."""
    temperature: float = 1.0
    """Softens both distributions inside the loss (> 0); the sampling temperature is separate."""
    lmbda: float = 1.0
    """Probability that a batch comes from student rollouts (GKD semantics, drawn per batch);
    0 = dataset responses only, 1 = rollouts only."""
    loss: str = "full"
    """One of :data:`LOSS_KINDS`: "full" generalized JSD over the vocabulary (teacher TP must
    equal the student's), "topk" against the teacher's top-k + tail, "sampled" the sampled-token
    reverse KL advantage (seed 003; β is not used)."""
    topk: int = 64
    """k of the "topk" loss and of the teacher cache (>= 1)."""
    clip_ratio: float = 0.0
    """"sampled" loss: PPO clip ε of the importance ratio; 0 = no clipping."""
    continuous: bool = False
    """Divide the interior JSD by β(1 − β) so the loss is continuous in β."""
    strategy: StrategyConfig = StrategyConfig()
    """The schedule (on_policy_gkd, hybrid, ...)."""
    teacher_context: str = ""
    """Context distillation (seed 004 phase 1): text (e.g. few-shot examples) the teacher sees
    before every prompt and the student does not; "" = off."""
    teacher_cache_dir: str = ""
    """Cache teacher top-k log-probs of dataset (off-policy) sequences here; "" = off. Used
    with loss="topk" only."""

    def __post_init__(self) -> None:
        for field in ("beta", "lmbda"):
            if not _is_number(getattr(self, field)) or not 0 <= getattr(self, field) <= 1:
                _fail(self, field, "a number in [0, 1]")
        if not _is_number(self.temperature) or self.temperature <= 0:
            _fail(self, "temperature", "a finite number > 0")
        if not _is_number(self.clip_ratio) or self.clip_ratio < 0:
            _fail(self, "clip_ratio", "a finite number >= 0 (0 = off)")
        _check_choice(self, "loss", LOSS_KINDS)
        _check_ints(self, 1, "topk")
        if not isinstance(self.strategy, StrategyConfig):
            _fail(self, "strategy", "a StrategyConfig")
        for field in ("teacher_context", "teacher_cache_dir"):
            if not isinstance(getattr(self, field), str):
                _fail(self, field, "a string")
        if self.teacher_cache_dir and self.loss != "topk":
            _fail(self, "teacher_cache_dir", f'"" unless loss="topk" (loss is {self.loss!r})')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, clipping and gradient accumulation.

    Numerics follow megatron-core: with bf16/fp16 parameters the optimizer keeps fp32 master
    weights and fp32 moments, gradients are accumulated and reduced in fp32, and fp16 adds loss
    scaling (:mod:`nemo_opd.train.optim`)."""

    lr: float = 1e-5
    """Peak learning rate (> 0)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay (0 <= min_lr <= lr)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr (>= 0, < steps)."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (norms and biases get none); >= 0."""
    adam_beta1: float = 0.9
    """AdamW β1 in [0, 1)."""
    adam_beta2: float = 0.999
    """AdamW β2 in [0, 1)."""
    adam_eps: float = 1e-8
    """AdamW ε (> 0)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    grad_accumulation: int = 1
    """Micro batches per optimizer step (>= 1)."""
    steps: int = 100
    """Optimizer steps (>= 1); extended_on_policy multiplies it."""
    micro_batch_size: int = 4
    """Prompts per micro batch per data-parallel rank (rollouts: × sampling.n rows)."""
    use_distributed_optimizer: bool = True
    """Shard fp32 master weights and optimizer moments over the data-parallel ranks (megatron's
    distributed optimizer, GPU). Without CUDA every rank keeps the full fp32 state."""
    loss_scale: float = 0.0
    """fp16 only: a fixed loss scale; 0 = dynamic loss scaling (bf16/fp32 use none)."""
    initial_loss_scale: float = 2.0**16
    """fp16 dynamic loss scaling: the starting scale (> 0)."""
    min_loss_scale: float = 1.0
    """fp16 dynamic loss scaling: the scale never drops below this (> 0)."""
    loss_scale_window: int = 1000
    """fp16 dynamic loss scaling: steps without overflow before the scale doubles (>= 1)."""
    hysteresis: int = 2
    """fp16 dynamic loss scaling: overflowing steps tolerated before the scale halves (>= 1)."""
    divergence_factor: float = 10.0
    """Stop when a step's loss or KL exceeds this many times its running level (the median of
    the last 10 steps, at least 1 nat), or its gradient norm is 0 with a non-zero loss
    (nemo_opd.train.divergence); 0 = only the zero-gradient and non-finite checks."""

    def __post_init__(self) -> None:
        if not _is_number(self.lr) or self.lr <= 0:
            _fail(self, "lr", "a finite number > 0")
        if not _is_number(self.min_lr) or not 0 <= self.min_lr <= self.lr:
            _fail(self, "min_lr", f"a number in [0, lr={self.lr}]")
        for field in ("adam_beta1", "adam_beta2"):
            if not _is_number(getattr(self, field)) or not 0 <= getattr(self, field) < 1:
                _fail(self, field, "a number in [0, 1)")
        for field in ("weight_decay", "grad_clip"):
            if not _is_number(getattr(self, field)) or getattr(self, field) < 0:
                _fail(self, field, "a finite number >= 0")
        if not _is_number(self.adam_eps) or self.adam_eps <= 0:
            _fail(self, "adam_eps", "a finite number > 0")
        _check_ints(self, 1, "grad_accumulation", "steps", "micro_batch_size",
                    "loss_scale_window", "hysteresis")
        _check_ints(self, 0, "warmup_steps")
        if not isinstance(self.use_distributed_optimizer, bool):
            _fail(self, "use_distributed_optimizer", "a bool")
        if not _is_number(self.loss_scale) or self.loss_scale < 0:
            _fail(self, "loss_scale", "a finite number >= 0 (0 = dynamic)")
        for field in ("initial_loss_scale", "min_loss_scale"):
            if not _is_number(getattr(self, field)) or getattr(self, field) <= 0:
                _fail(self, field, "a finite number > 0")
        if not _is_number(self.divergence_factor) or not (
                self.divergence_factor == 0 or self.divergence_factor > 1):
            _fail(self, "divergence_factor", "0 (off) or a finite number > 1")
        if self.warmup_steps >= self.steps:
            _fail(self, "warmup_steps", f"< steps={self.steps}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prompt/response data (nemo_opd.data)."""

    train_files: tuple[str, ...] = ()
    """Local .jsonl / .json / .parquet files; or empty with ``hub_name`` set."""
    hub_name: str = ""
    """A ``datasets`` hub name (used when ``train_files`` is empty)."""
    split: str = "train"
    """Split of the hub dataset."""
    prompt_field: str = "prompt"
    """Column holding the prompt text."""
    response_field: str = "response"
    """Column holding the reference response (off-policy data); "" = prompts only (then the
    run must be fully on-policy)."""
    chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template when it has one (plain text otherwise)."""
    max_prompt_length: int = 256
    """Most prompt tokens (>= 1); longer prompts follow ``overlong``."""
    max_response_length: int = 256
    """Most dataset-response tokens (>= 1); longer responses are cut at this length."""
    overlong: str = "truncate_left"
    """Prompts over ``max_prompt_length``: "truncate_left" keeps the last tokens, "drop" skips
    the example (counted and logged), "error" raises naming the example."""
    shuffle: bool = True
    """Reshuffle every epoch with a generator seeded by RunConfig.seed and the epoch."""

    def __post_init__(self) -> None:
        if not isinstance(self.train_files, tuple) or not all(
                isinstance(f, str) and f for f in self.train_files):
            _fail(self, "train_files", "a tuple of non-empty path strings")
        if not self.train_files and not self.hub_name:
            _fail(self, "train_files", "non-empty, or hub_name set")
        if not self.prompt_field:
            _fail(self, "prompt_field", "a non-empty column name")
        _check_ints(self, 1, "max_prompt_length", "max_response_length")
        _check_choice(self, "overlong", OVERLONG_POLICIES)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Atomic megatron distributed checkpoints of the whole training state."""

    dir: str = ""
    """Where checkpoints go; "" = ``<output_dir>/checkpoints``."""
    save_every: int = 0
    """Save every this-many optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted after a successful save; >= 1)."""
    resume: bool = True
    """Continue from the latest checkpoint in ``dir`` when there is one."""

    def __post_init__(self) -> None:
        _check_ints(self, 0, "save_every")
        _check_ints(self, 1, "keep_last")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Who writes the student's rollouts, in what batches, and how the trainer corrects for an
    engine whose numerics differ from its own."""

    engine: str = "megatron"
    """One of :data:`ROLLOUT_ENGINES`: "megatron" the training student itself (colocated, the
    trainer's own numerics); "hf" Hugging Face ``generate`` on the student's dequantised weights,
    refit in place after every optimizer step; "trtllm" / "vllm" external engines refit through
    their weight-update calls (containers only)."""
    batch_size: int = 0
    """Prompts per engine call; 0 = all of this data-parallel rank's prompts of the step (every
    micro batch at once), independent of ``optim.micro_batch_size``."""
    importance: str = "truncate"
    """One of :data:`IMPORTANCE_CORRECTIONS`, applied to every loss on rollout tokens with the
    ratio ``r = exp(log πθ − log μ)`` of the trainer's and the engine's log-probs: "truncate"
    weights each token by ``min(r, importance_cap)``; "mask" drops tokens with ``r`` outside
    ``[1 / importance_cap, importance_cap]``; "none" ignores the engine's log-probs."""
    importance_cap: float = 2.0
    """The cap of "truncate" and the band of "mask" (> 1)."""

    def __post_init__(self) -> None:
        _check_choice(self, "engine", ROLLOUT_ENGINES)
        _check_ints(self, 0, "batch_size")
        _check_choice(self, "importance", IMPORTANCE_CORRECTIONS)
        if not _is_number(self.importance_cap) or self.importance_cap <= 1:
            _fail(self, "importance_cap", "a finite number > 1")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where per-step metrics go."""

    every: int = 1
    """Log every this-many optimizer steps (>= 1)."""
    jsonl: bool = True
    """Append metrics to ``<output_dir>/metrics.jsonl`` (rank 0)."""
    tensorboard: bool = True
    """Write TensorBoard events to ``<output_dir>/tensorboard`` when tensorboard is installed."""
    wandb_project: str = ""
    """Weights & Biases project; "" = off."""
    progress_bar: bool = True
    """Training progress on rank 0: a bar with ETA on a terminal, else a plain line every tenth
    of the run."""

    def __post_init__(self) -> None:
        _check_ints(self, 1, "every")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole distillation run."""

    model: ModelConfig
    """Student, teacher, tokenizer, layouts, dtypes."""
    data: DataConfig
    """Training prompts / responses."""
    quant: QuantConfig = QuantConfig()
    """Student quantization."""
    distill: DistillConfig = DistillConfig()
    """Objective and schedule."""
    sampling: SamplingParams = SamplingParams(max_new_tokens=128)
    """Student rollouts (its ``seed`` is replaced per step by one derived from ``seed``)."""
    rollout: RolloutConfig = RolloutConfig()
    """Rollout engine, batching and importance correction."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Saving and resuming."""
    logging: LoggingConfig = LoggingConfig()
    """Metrics sinks."""
    output_dir: str = "runs/nemo_opd"
    """Run directory (checkpoints, metrics.jsonl, tensorboard/ unless set elsewhere)."""
    eval_every: int = 0
    """Call the evaluation hook every this-many steps (0 = never; the final step always when
    a hook is given)."""
    seed: int = 1234
    """Seeds weights-independent randomness: data order, λ draws, sampling, replay."""

    def __post_init__(self) -> None:
        nodes = {"model": ModelConfig, "data": DataConfig, "quant": QuantConfig,
                 "distill": DistillConfig, "sampling": SamplingParams, "optim": OptimConfig,
                 "checkpoint": CheckpointConfig, "logging": LoggingConfig}
        for field, kind in nodes.items():
            if not isinstance(getattr(self, field), kind):
                _fail(self, field, f"a {kind.__name__}")
        if not self.output_dir:
            _fail(self, "output_dir", "a non-empty path")
        _check_ints(self, 0, "eval_every", "seed")
        student_tp = self.model.student_parallel.tensor_model_parallel_size
        teacher_tp = self.model.teacher_parallel.tensor_model_parallel_size
        if max(student_tp, teacher_tp) % min(student_tp, teacher_tp):
            raise ValueError(
                f"ModelConfig.teacher_parallel.tensor_model_parallel_size = {teacher_tp} and "
                f"student_parallel.tensor_model_parallel_size = {student_tp} must divide one "
                "another (each teacher TP group must hold whole student TP groups, or sit inside "
                "one)")
        teacher_pp = self.model.teacher_parallel.pipeline_model_parallel_size
        teacher_ep = self.model.teacher_parallel.expert_model_parallel_size
        if ((teacher_tp > student_tp or teacher_pp > 1 or teacher_ep > 1)
                and self.distill.strategy.name == "teacher_seeded"):
            raise ValueError(
                f"StrategyConfig.name = 'teacher_seeded' needs teacher TP ({teacher_tp}) <= "
                f"student TP ({student_tp}), teacher PP = 1 (got {teacher_pp}) and teacher "
                f"EP = 1 (got {teacher_ep}): the teacher writes prefixes for one student batch "
                "at a time, each rank on its own, with the whole model and all its experts")
        if self.distill.loss == "full" and self.model.teacher_parallel != \
                self.model.student_parallel:
            raise ValueError(
                f"DistillConfig.loss = 'full' needs the teacher's layout "
                f"({self.model.teacher_parallel}) to equal the student's "
                f"({self.model.student_parallel}): full-vocabulary logits are not moved between "
                "layouts; use loss='topk' or 'sampled'")
        self._check_pipeline()
        off_policy_needed = self.distill.lmbda < 1 or self.distill.strategy.name in (
            "hybrid", "mixture", "reverse_curriculum")
        if off_policy_needed and not self.data.response_field:
            raise ValueError(
                f"DataConfig.response_field = '' (prompts only) but the run needs dataset "
                f"responses (distill.lmbda = {self.distill.lmbda}, strategy "
                f"{self.distill.strategy.name!r})")
        if self.distill.strategy.name == "teacher_seeded" and self.distill.loss == "sampled" \
                and self.distill.strategy.seed_prefix_loss:
            raise ValueError("StrategyConfig.seed_prefix_loss = True cannot be used with "
                             "DistillConfig.loss = 'sampled': the teacher-written tokens were "
                             "not sampled from the student")

    @property
    def needs_rollouts(self) -> bool:
        """Whether any batch of the run comes from student (or teacher-seeded) rollouts."""
        strategy = self.distill.strategy
        if strategy.name == "mixture":
            return strategy.mixture_weight < 1
        return self.distill.lmbda > 0

    def _check_pipeline(self) -> None:
        student_pp = self.model.student_parallel.pipeline_model_parallel_size
        if student_pp > 1 and self.needs_rollouts:
            raise ValueError(
                f"ModelConfig.student_parallel.pipeline_model_parallel_size = {student_pp} with "
                f"rollouts (distill.lmbda = {self.distill.lmbda}, strategy "
                f"{self.distill.strategy.name!r}): the colocated rollout engine generates with "
                "the whole model on each rank (PP = 1). Use tensor parallelism instead "
                "(student_parallel.tensor_model_parallel_size), or train off-policy at PP > 1 "
                "(distill.lmbda = 0)")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run (``optim.steps``, × extended_factor for
        extended_on_policy)."""
        strategy = self.distill.strategy
        factor = strategy.extended_factor if strategy.name == "extended_on_policy" else 1
        return self.optim.steps * factor

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for logging and checkpoints)."""
        return dataclasses.asdict(self)
