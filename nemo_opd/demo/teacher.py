"""Train the demo's tiny teacher: plain next-token cross-entropy on the task's training text.

``python -m nemo_opd.demo.teacher OUT_DIR`` writes an HF model directory (``save_pretrained``:
``config.json``, ``model.safetensors``, tokenizer files) that :func:`nemo_opd.models.load_hf_gpt`
imports. The run is deterministic for a given :class:`TeacherConfig` and task on one torch build
(seeded initialisation, batch order and no dropout; one CPU thread). After training, a few
residual channels get outlier weights (:func:`add_outlier_channels`, function-preserving) and the
weights are saved in bf16. ``--ship`` also refreshes the copy shipped in
``nemo_opd/demo/assets`` that :func:`nemo_opd.demo.prepare_demo` starts from. ``--model``
picks another shipped model (:data:`MODELS`): finding 2's chain-sum teacher and weak student are
trained by the same code, with :data:`CHAIN_TEACHER` / :data:`CHAIN_STUDENT`, and finding 3c's
start (``demo_finetuned``, :data:`FINETUNED_DEMO`) is the shipped demo teacher trained further on
:class:`~nemo_opd.demo.finetune.FineTuneTask`'s mixture (``init_dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from nemo_opd.demo.chain import ChainSumTask
from nemo_opd.demo.finetune import FineTuneTask
from nemo_opd.demo.task import AdditionTask, make_task_tokenizer
from nemo_opd.models.tiny import TinyModelSpec, make_tiny_hf_model

__all__ = ["CHAIN_STUDENT", "CHAIN_STUDENTS", "CHAIN_TEACHER", "DemoTask", "FINETUNED_DEMO",
           "FineTuned", "MODELS", "TRAINER_VERSION", "TeacherConfig", "TeacherRun",
           "add_outlier_channels", "outlier_channel_ids", "train_teacher", "main"]

logger = logging.getLogger(__name__)

DemoTask = AdditionTask | ChainSumTask | FineTuneTask
"""The tasks demo models are trained on: each gives ``train_records()`` and ``eval_records()``."""

TRAINER_VERSION = 1
"""Bump when training changes what a config produces: cached teachers are keyed on it."""


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Shape and training schedule of a demo model (the teacher, or a student trained apart)."""

    family: str = "llama"
    """Tiny model family (:data:`nemo_opd.models.tiny.TINY_FAMILIES`)."""
    hidden_size: int = 256
    """Hidden size; a multiple of 128 so INT4's 128-element blocks fit at TP=1 and TP=2."""
    intermediate_size: int = 512
    """MLP (SwiGLU) width; a multiple of 256 for the same reason."""
    num_layers: int = 2
    """Transformer layers."""
    steps: int = 2500
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step, drawn with replacement from the training problems."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to zero)."""
    warmup_steps: int = 50
    """Linear warmup steps (< steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    outlier_channels: int = 16
    """Hidden channels given outlier weights after training (0: none), see
    :func:`add_outlier_channels`."""
    outlier_scale: float = 8.0
    """Factor by which those channels' input weights grow (their norm weights shrink by it); a
    power of two, so the rescaling is exact in any float format and commutes with the bf16
    rounding of the saved weights."""
    seed: int = 0
    """Seed of the initialisation, the batch order and the outlier channels."""
    log_every: int = 100
    """Log the loss every this many steps."""

    def __post_init__(self) -> None:
        from nemo_opd.models.tiny import TINY_FAMILIES

        if self.family not in TINY_FAMILIES:
            raise ValueError(f"TeacherConfig.family must be one of {TINY_FAMILIES}, "
                             f"got {self.family!r}")
        for name, multiple in (("hidden_size", 128), ("intermediate_size", 256)):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"TeacherConfig.{name} must be a positive multiple of "
                                 f"{multiple}, got {value!r}")
        for name in ("num_layers", "steps", "batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TeacherConfig.{name} must be an int >= 1, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TeacherConfig.warmup_steps must be an int in [0, steps), "
                             f"got {self.warmup_steps!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"TeacherConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.outlier_channels, int) or not (
                0 <= self.outlier_channels <= self.hidden_size):
            raise ValueError(f"TeacherConfig.outlier_channels must be an int in [0, hidden_size="
                             f"{self.hidden_size}], got {self.outlier_channels!r}")
        if (not isinstance(self.outlier_scale, (int, float)) or not self.outlier_scale >= 1
                or math.log2(self.outlier_scale) % 1):
            raise ValueError(f"TeacherConfig.outlier_scale must be a power of two >= 1 (exact "
                             f"in bf16), got {self.outlier_scale!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TeacherConfig.weight_decay must be >= 0, "
                             f"got {self.weight_decay!r}")

    @property
    def spec(self) -> TinyModelSpec:
        """The tiny model's shape (4 heads, 2 KV heads: TP=2 fits)."""
        return TinyModelSpec(hidden_size=self.hidden_size,
                             intermediate_size=self.intermediate_size,
                             num_hidden_layers=self.num_layers, max_position_embeddings=64)


CHAIN_TEACHER = TeacherConfig(num_layers=4, steps=2500, batch_size=32, outlier_channels=0,
                              log_every=50)
"""Finding 2's teacher (``docs/reproduction.md``): 4 layers, hidden 256, trained to ≥ 0.9 on
:class:`~nemo_opd.demo.chain.ChainSumTask`; no outlier channels (not a quantization study)."""

CHAIN_STUDENT = dataclasses.replace(CHAIN_TEACHER, num_layers=2, hidden_size=128,
                                    intermediate_size=256, steps=600)
"""Finding 2's weak student: 2 layers, hidden 128, the same data for 600 steps only (0.10 exact
match; the measurements that chose it are in ``docs/reproduction.md``)."""

CHAIN_STUDENTS = {"2x128": CHAIN_STUDENT,
                  "2x256": dataclasses.replace(CHAIN_STUDENT, hidden_size=256,
                                               intermediate_size=512),
                  "4x256": dataclasses.replace(CHAIN_STUDENT, num_layers=4, hidden_size=256,
                                               intermediate_size=512)}
"""Finding 4's students (layers x hidden), each pre-trained the same 600 steps: the capability
gap to :data:`CHAIN_TEACHER` shrinks with size. The 2x128 one is :data:`CHAIN_STUDENT`."""

@dataclasses.dataclass(frozen=True)
class FineTuned:
    """A model fine-tuned from its asset set's teacher: :attr:`cfg`'s schedule on :attr:`task`'s
    mixture, starting from the teacher's weights (finding 3c, seed 003 §4)."""

    task: FineTuneTask = FineTuneTask()
    cfg: TeacherConfig = TeacherConfig()
    """Schedule (steps, lr, batch, seed); its shape must be the teacher's."""


FINETUNED_DEMO = FineTuned(
    task=FineTuneTask(old_share=0.1),
    cfg=dataclasses.replace(TeacherConfig(), steps=1000, lr=5e-4, warmup_steps=10,
                            outlier_channels=0))
"""Finding 3c's start: the demo teacher fine-tuned on subtraction with 10 % addition mixed in,
1000 steps at a quarter of its pre-training lr (addition 0.994 → 0.480, subtraction 0.002 →
0.958; the measurements that chose it are in ``docs/reproduction.md``). No new outlier channels:
the teacher's are in the weights it starts from."""

MODELS = {"demo": (AdditionTask(), TeacherConfig(), "teacher"),
          "chain_teacher": (ChainSumTask(), CHAIN_TEACHER, "chain/teacher"),
          "chain_student": (ChainSumTask(), CHAIN_STUDENT, "chain/student"),
          **{f"chain_student_{size}": (ChainSumTask(), cfg, "")
             for size, cfg in CHAIN_STUDENTS.items() if cfg != CHAIN_STUDENT},
          "demo_finetuned": (AdditionTask(), FINETUNED_DEMO, "finetuned")}
"""The demo models: name → (task, config, where ``--ship`` puts it under
``nemo_opd/demo/assets``; "" = not shipped, trained on first use). A :class:`FineTuned` config
is fine-tuned from the shipped demo teacher."""


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """What :func:`train_teacher` produced."""

    model_dir: Path
    """The HF model directory (weights + tokenizer)."""
    train_seconds: float
    """Wall time of the optimisation loop."""
    final_loss: float
    """Mean training loss (per answer token) over the last ``log_every`` steps."""


@torch.no_grad()
def add_outlier_channels(model: torch.nn.Module, channels: torch.Tensor, scale: float) -> None:
    """Give ``channels`` of the residual stream outlier weights, without changing the function.

    In every decoder layer, each RMSNorm's weight on ``channels`` is divided by ``scale`` and
    the input columns ``channels`` of the linears that read that norm's output (q/k/v after
    ``input_layernorm``; gate/up after ``post_attention_layernorm``) are multiplied by it:
    ``W · (w ⊙ x̂) = (W · diag(s)) · (diag(1/s) · w ⊙ x̂)``, exact in real arithmetic.

    Why: large LLMs carry a few such channels (LLM.int8(), SmoothQuant, AWQ), and they are what
    makes 4-bit weight quantization lossy — a block's scale follows its largest weight, so the
    other weights in any block holding an outlier column get few levels. A model this small,
    trained for minutes, has none and quantizes almost losslessly (measured, see the report in
    ``nemo_opd/demo/assets``); this gives the demo teacher the structure of a real one.
    """
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, linears in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            norm.weight[channels] /= scale
            for linear in linears:
                linear.weight[:, channels] *= scale


def outlier_channel_ids(cfg: TeacherConfig) -> torch.Tensor:
    """The ``cfg.outlier_channels`` hidden channels :func:`train_teacher` rescales (seeded by
    ``cfg.seed`` alone, independent of training)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.randperm(cfg.hidden_size, generator=generator)[:cfg.outlier_channels]


def _lr_at(step: int, cfg: TeacherConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _load_weights(model: torch.nn.Module, init_dir: Path) -> None:
    """Copy ``init_dir``'s weights into ``model`` (upcast); ``ValueError`` on another shape."""
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32).state_dict()
    target = model.state_dict()
    mismatched = sorted(k for k in target.keys() | source.keys()
                        if k not in source or k not in target or source[k].shape != target[k].shape)
    if mismatched:
        raise ValueError(f"{init_dir} does not have the configured model's shape; differing "
                         f"tensors: {mismatched[:4]}")
    model.load_state_dict(source)


def train_teacher(out_dir: str | Path, task: DemoTask | None = None,
                  cfg: TeacherConfig | None = None, init_dir: str | Path | None = None
                  ) -> TeacherRun:
    """Train a teacher for ``task`` with ``cfg`` and ``save_pretrained`` it to ``out_dir``.

    Loss: mean next-token cross-entropy over the answer tokens and the EOS that ends them (the
    prompt is context only), the trainer's convention for ``{"prompt", "response"}`` data.
    ``init_dir``: start from that HF model's weights (fine-tuning; its shape must be
    ``cfg.spec``'s) instead of the seeded random initialisation.
    """
    from transformers import AutoModelForCausalLM

    from nemo_opd.demo.score import encode_pairs

    task = task or AdditionTask()
    cfg = cfg or TeacherConfig()
    out_dir = Path(out_dir)
    tokenizer = make_task_tokenizer()
    records = task.train_records()
    ids, prompt_len = encode_pairs(tokenizer, [(r["prompt"], r["response"]) for r in records])
    # Random initialisation (seeded) and tokenizer written first, then trained in place.
    make_tiny_hf_model(out_dir, cfg.family, cfg.spec, seed=cfg.seed, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    if init_dir is not None:
        _load_weights(model, Path(init_dir))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.98))
    order = torch.Generator().manual_seed(cfg.seed)
    logger.info("training the demo teacher (%s, %d layers, hidden %d) on %d problems for %d "
                "steps", cfg.family, cfg.num_layers, cfg.hidden_size, len(records), cfg.steps)
    start, recent = time.perf_counter(), []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        batch = ids[torch.randint(len(ids), (cfg.batch_size,), generator=order)]
        logits = model(input_ids=batch).logits[:, prompt_len - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 batch[:, prompt_len:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = [*recent[-(cfg.log_every - 1):], loss.item()]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.info("teacher step %d/%d  loss %.4f  (%.0f s)", step + 1, cfg.steps,
                        sum(recent) / len(recent), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if cfg.outlier_channels:
        channels = outlier_channel_ids(cfg)
        add_outlier_channels(model, channels, cfg.outlier_scale)
        logger.info("outlier channels %s scaled by %g", sorted(channels.tolist()),
                    cfg.outlier_scale)
    # Stored in bf16, as released checkpoints are (and small enough to ship); loaders upcast.
    model.to(torch.bfloat16).save_pretrained(out_dir)
    return TeacherRun(out_dir, seconds, sum(recent) / len(recent))


def main(argv: list[str] | None = None) -> None:
    """``python -m nemo_opd.demo.teacher OUT_DIR [--model NAME] [--steps N] [--ship]``."""
    from nemo_opd.demo.assets import SHIPPED_TEACHER, model_key, record_teacher, ship_teacher

    parser = argparse.ArgumentParser(prog="python -m nemo_opd.demo.teacher",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where the HF model directory is written")
    parser.add_argument("--model", choices=MODELS, default="demo",
                        help="which shipped model's task and config (default: %(default)s, the "
                             "demo teacher; chain_teacher / chain_student: finding 2 of "
                             "docs/reproduction.md; demo_finetuned: finding 3c's, fine-tuned "
                             "from the shipped demo teacher)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: the model's config)")
    parser.add_argument("--ship", action="store_true",
                        help="also copy the result into nemo_opd/demo/assets (default config "
                             "only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    task, default, where = MODELS[args.model]
    init_dir = None
    if isinstance(default, FineTuned):  # fine-tuned from the shipped demo teacher
        task, default, init_dir = default.task, default.cfg, SHIPPED_TEACHER
    # A short run (a smoke test) keeps the default warmup only if it fits.
    steps = default.steps if args.steps is None else args.steps
    cfg = dataclasses.replace(default, steps=steps,
                              warmup_steps=min(default.warmup_steps, steps - 1))
    run = record_teacher(args.out_dir, task, cfg, init_dir=init_dir)
    logger.info("%s written to %s in %.0f s (final loss %.4f)", args.model, run.model_dir,
                run.train_seconds, run.final_loss)
    if args.ship:
        if cfg != default or not where:
            parser.error("--ship needs the default configuration (no --steps) of a shipped "
                         f"model ({', '.join(n for n, m in MODELS.items() if m[2])})")
        init_key = None if init_dir is None else model_key(*MODELS["demo"][:2])
        logger.info("shipped copy: %s", ship_teacher(run.model_dir, task, cfg, where, init_key))


if __name__ == "__main__":
    main()
