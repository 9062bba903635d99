"""An ``lm_eval`` language model backed by a megatron-core ``GPTModel`` and an HF tokenizer.

:class:`MegatronLM` lets lm-eval score the teacher, the fake-quant student or a PTQ baseline
exactly as it scores a Hugging Face model: it subclasses lm-eval's ``TemplateLM``, so context /
continuation tokenisation is lm-eval's own (the same code path as its ``HFLM``), and implements
the three request types:

* ``loglikelihood`` — ``Σ_t log p(cont_t | ctx, cont_<t)`` over the continuation tokens, and
  whether greedy decoding reproduces the continuation;
* ``loglikelihood_rolling`` — the same over lm-eval's disjoint rolling windows of a document;
* ``generate_until`` — greedy decoding until a stop string, EOS or the token budget.

Tensor parallelism: every rank of the model's TP group must make the same calls with the same
requests (lm-eval sees a world of one on each rank; data-parallel ranks duplicate the work). The
logits of a forward are this rank's vocabulary shard ``[b, s, V/tp]``; log-probabilities come from
:func:`nemo_opd.loss.vocab_parallel_logprobs` and greedy tokens from a TP-global argmax, so every
rank computes identical results; only global rank 0 shows progress bars, and only on a terminal.

Greedy decoding runs on the rollout engine
(:class:`~nemo_opd.rollout.megatron_engine.MegatronEngine`, megatron's static KV cache), the same
decoder the trainer's on-policy rollouts use.

From a checkpoint directory: :func:`open_megatron_lm` (a context manager; ``nemo_opd eval`` uses
it) or :meth:`MegatronLM.from_pretrained`, which lm-eval calls for ``--model nemo_opd
--model_args pretrained=DIR,tp=2,dtype=bfloat16,export=true`` — importing this module registers
the class under that name in lm-eval's model registry (lm-eval 0.4.13 cannot discover it by
itself; :mod:`nemo_opd.eval.lm_eval_cli` runs lm-eval's own command line with it registered).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own names first; see MODEL_NAME)
import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from nemo_opd.console import is_verbose
from nemo_opd.loss import vocab_parallel_logprobs
from nemo_opd.runtime import is_rank0

__all__ = ["LMConfig", "MODEL_NAME", "MegatronLM", "TokenizerRoundTripError",
           "describe_numerics", "dtype_label", "open_megatron_lm"]

logger = logging.getLogger(__name__)

MODEL_NAME = "nemo_opd"
"""lm-eval model name of :class:`MegatronLM` (``--model nemo_opd``). lm-eval's ``get_model``
fills its registry with lm-eval's own models only while the registry is empty, so this module
imports ``lm_eval.models`` before registering: otherwise ``--model hf`` would stop resolving in
a process that imported this module first."""

# (request string or None, context token ids, continuation token ids), as TemplateLM builds them.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


class TokenizerRoundTripError(ValueError):
    """The tokenizer cannot encode and decode a task's text back to itself."""


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """How :class:`MegatronLM` batches, truncates and decodes."""

    batch_size: int = 8
    """Requests per forward pass (sequences are right-padded to the longest in the batch)."""

    max_length: int | None = None
    """Longest token sequence fed to the model; None: the model's ``max_sequence_length``.
    Longer inputs are truncated from the left, as lm-eval's HF model does."""

    max_gen_toks: int = 256
    """Default generation budget when a task's ``generation_kwargs`` name none."""

    add_bos_token: bool | None = None
    """Passed to the tokenizer as ``add_special_tokens``; None keeps the tokenizer's default
    (lm-eval's ``HFLM`` convention)."""

    check_round_trip: bool = True
    """Refuse task text the tokenizer cannot decode back to itself (unknown characters would
    otherwise be scored as ``<unk>`` silently). Whitespace-only differences only warn."""

    numerics: str | None = None
    """Label for the results table (e.g. ``"megatron fake-quant int4 fp32"``); None: derived
    from the model (:func:`describe_numerics`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"LMConfig.batch_size must be a positive integer, "
                             f"got {self.batch_size!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int)
                                            or self.max_length < 2):
            raise ValueError(f"LMConfig.max_length must be None or an integer >= 2, "
                             f"got {self.max_length!r}")
        if not isinstance(self.max_gen_toks, int) or self.max_gen_toks < 1:
            raise ValueError(f"LMConfig.max_gen_toks must be a positive integer, "
                             f"got {self.max_gen_toks!r}")


def dtype_label(dtype: torch.dtype | str) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for a torch dtype or its name (results-table spelling)."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def describe_numerics(model: torch.nn.Module) -> str:
    """How ``model`` computes, for results tables: ``"megatron fp32"``, or with ModelOpt fake
    quantizers ``"megatron fake-quant int4 fp32"`` (the weight format, ``w+a`` when activations
    are quantized too; dtype of the first parameter)."""
    short = dtype_label(next(model.parameters()).dtype)
    quantized = [m for m in model.modules()
                 if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)]
    if not quantized:
        return f"megatron {short}"
    from nemo_opd.quant.export import weight_format

    try:
        fmt = weight_format(quantized[0])
    except NotImplementedError:  # a format the exporter does not name (INT8, W4A8, ...)
        fmt = "custom"
    acts = any(getattr(getattr(m, "input_quantizer", None), "is_enabled", False)
               for m in quantized)
    return f"megatron fake-quant {fmt}{' w+a' if acts else ''} {short}"


@register_model(MODEL_NAME)
class MegatronLM(TemplateLM):
    """lm-eval ``LM`` over a megatron-core ``GPTModel`` (any TP size) and an HF tokenizer.

    From a checkpoint directory, lm-eval style: :meth:`from_pretrained` (what
    ``--model nemo_opd --model_args ...`` calls).

    Args:
        model: a ``GPTModel`` built with ``parallel_output=True`` (vocab-sharded logits); it is
            switched to eval mode.
        tokenizer: a ``transformers`` tokenizer whose ids match the model's vocabulary.
        config: batching / truncation / decoding settings.
        tp_group: the group sharding the model's vocabulary; default the model's own
            ``pg_collection.tp``.
    """

    backend = "causal"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: LMConfig | None = None,
                 *, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config or LMConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; lm-eval needs an end-of-text "
                             "token to stop generation and to prefix empty contexts")
        if model.pg_collection.pp.size() > 1:
            raise ValueError(
                "MegatronLM evaluates a whole model per rank (pipeline_model_parallel_size = 1), "
                f"got a pipeline stage of {model.pg_collection.pp.size()}; restore the "
                "checkpoint at PP = 1 (nemo_opd.launch.stages.whole_student_from_checkpoint) "
                "or evaluate the export")
        group = tp_group if tp_group is not None else model.pg_collection.tp
        self._tp_group = group if dist.get_world_size(group) > 1 else None
        self._tp_rank = dist.get_rank(group) if self._tp_group is not None else 0
        # A bar per request type on a terminal; in a log file (no terminal) none: \r-redrawn
        # bars would make one giant line of it.
        self._show_progress = is_rank0() and sys.stderr.isatty()
        self._device = next(model.parameters()).device
        self.numerics = self.config.numerics or describe_numerics(model)
        self._max_length = self.config.max_length or int(model.max_sequence_length)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self._checked_texts: set[str] = set()
        self._warned_whitespace = False

    # ------------------------------------------------------------------ from a directory

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, *, tp: int = 1, dtype: str | None = None,
                        export: bool = False, batch_size: int | str = 8,
                        max_length: int | None = None, max_gen_toks: int = 256,
                        add_bos_token: bool | None = None, check_round_trip: bool = True,
                        device: str | None = None, max_batch_size: int | None = None,
                        ) -> MegatronLM:
        """Load ``pretrained`` (an HF model directory, or a ModelOpt unified export with
        ``export=True``) as a megatron ``GPTModel`` at tensor-parallel size ``tp`` and wrap it.

        The process runtime (``torch.distributed`` + megatron parallel state; under torchrun
        its world, else one process) and an export's dequantised copy are held by the returned
        LM and released by :meth:`close`, at garbage collection or at interpreter exit. A runtime
        that is already up is used as is (its TP size must be ``tp``).

        Args:
            pretrained: model directory.
            tp: tensor-parallel size (launch ``torchrun --nproc-per-node N`` for ``tp=N``).
            dtype: ``float32`` / ``bfloat16`` / ``float16``; None: the checkpoint's
                (:func:`nemo_opd.eval.exported.checkpoint_dtype`).
            export: ``pretrained`` is a ModelOpt unified export (``hf_quant_config.json``):
                evaluate its dequantised weights.
            batch_size, max_length, max_gen_toks, add_bos_token, check_round_trip:
                :class:`LMConfig` fields (``batch_size`` may be a numeric string, as lm-eval's
                ``--batch_size`` passes it; ``auto`` is not supported).
            device: lm-eval's ``--device`` (its CLI passes ``cuda:0`` unless told otherwise),
                ignored: the runtime places the model on ``cuda:LOCAL_RANK`` when CUDA is
                available, else on ``cpu``, as every TP rank must hold its shard locally.
            max_batch_size: lm-eval's, for ``batch_size=auto``; ignored.
        """
        del max_batch_size  # only meaningful with batch_size=auto, which is refused
        if isinstance(batch_size, str):
            if not batch_size.strip().isdigit():
                raise ValueError(f"MegatronLM needs a fixed batch size, got {batch_size!r} "
                                 "(lm-eval's 'auto' is not supported)")
            batch_size = int(batch_size)
        config = LMConfig(batch_size=batch_size, max_length=max_length,
                          max_gen_toks=max_gen_toks, add_bos_token=add_bos_token,
                          check_round_trip=check_round_trip)
        stack = contextlib.ExitStack()
        try:
            lm = stack.enter_context(open_megatron_lm(
                pretrained, tp=tp, dtype=dtype, export=_as_bool("export", export), config=config))
        except BaseException:
            stack.close()
            raise
        if device is not None and torch.device(device).type != lm._device.type:
            # lm-eval's CLI passes --device always (default cuda:0, on any machine), so only a
            # device asked for explicitly is worth a word: cpu on a CUDA machine.
            log = logger.warning if torch.device(device).type == "cpu" else logger.info
            log("device %r ignored: the runtime placed the model on %s", device, lm._device)
        lm._release = weakref.finalize(lm, stack.close)
        return lm

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> MegatronLM:
        """lm-eval's constructor hook: ``arg_dict`` = ``--model_args``, ``additional_config`` =
        ``--batch_size`` / ``--max_batch_size`` / ``--device``; a ``--model_args`` key wins over
        the same key there (lm-eval's ``--batch_size`` defaults to 1 and is always passed)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.from_pretrained(**(extra | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> MegatronLM:
        """``"pretrained=DIR,tp=2,..."``: parsed as lm-eval parses ``--model_args`` strings."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def close(self) -> None:
        """Release what :meth:`from_pretrained` holds (runtime, temporary files); idempotent.
        A no-op for an LM built around a model the caller owns."""
        release = getattr(self, "_release", None)
        if release is not None:
            release()

    # ------------------------------------------------------------------ lm-eval plumbing

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM's choice: BOS when the tokenizer has one, else EOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string``; ``add_special_tokens`` None: ``config.add_bos_token``, then
        the tokenizer's default, and never a second BOS before text that starts with one."""
        flag = add_special_tokens if add_special_tokens is not None else self.config.add_bos_token
        special = {} if flag is None else {"add_special_tokens": flag}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            special = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ input checks

    def check_round_trip(self, texts: Iterable[str]) -> None:
        """Raise :class:`TokenizerRoundTripError` for the first text the tokenizer cannot
        decode back to itself (ignoring whitespace-only differences, which are warned once)."""
        if not self.config.check_round_trip:
            return
        for text in texts:
            if text in self._checked_texts:
                continue
            decoded = self.tokenizer.decode(self.tokenizer.encode(text, add_special_tokens=False),
                                            clean_up_tokenization_spaces=False)
            if decoded != text:
                if decoded.split() != text.split():
                    pairs = enumerate(zip(text, decoded, strict=False))
                    at = next((i for i, (a, b) in pairs if a != b), min(len(text), len(decoded)))
                    raise TokenizerRoundTripError(
                        f"tokenizer {self.tokenizer_name!r} cannot round-trip the task text "
                        f"{_snippet(text, at)}: it decodes to {_snippet(decoded, at)} (first "
                        f"difference at character {at}). Scores would be computed on different "
                        "text; use the model's own tokenizer or one that covers these characters "
                        "(LMConfig.check_round_trip=False skips this check).")
                if not self._warned_whitespace:
                    logger.warning("tokenizer %s normalises whitespace (e.g. %r -> %r); scores "
                                   "use its normalised text", self.tokenizer_name, text[:60],
                                   decoded[:60])
                    self._warned_whitespace = True
            self._checked_texts.add(text)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.check_round_trip(context + continuation for context, continuation in
                              (req.args for req in requests))
        # lm-eval's own "Tokenizing inputs" bar: a third-party bar (nemo_opd.console).
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not is_verbose())

    # ------------------------------------------------------------------ model math

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` token ids → this rank's vocab shard of the logits ``[b, s, V/tp]``.

        Right padding needs no attention mask: with a causal mask a position never sees the pad
        tokens after it.
        """
        ids = ids.to(self._device)
        positions = torch.arange(ids.shape[1], device=self._device).expand_as(ids)
        return self.model(ids, positions, attention_mask=None)

    def _greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """Global-vocabulary ``argmax`` of vocab-sharded ``logits [..., V/tp]`` → ``[...]``,
        identical on every TP rank; ties go to the lowest id, as ``torch.argmax`` does."""
        values, index = logits.float().max(dim=-1)
        if self._tp_group is None:
            return index
        index = index + self._tp_rank * logits.shape[-1]
        size = dist.get_world_size(self._tp_group)
        all_values = [torch.empty_like(values) for _ in range(size)]
        all_index = [torch.empty_like(index) for _ in range(size)]
        dist.all_gather(all_values, values.contiguous(), group=self._tp_group)
        dist.all_gather(all_index, index.contiguous(), group=self._tp_group)
        best = torch.stack(all_values).argmax(dim=0, keepdim=True)  # first maximal shard
        return torch.stack(all_index).gather(0, best).squeeze(0)

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """``(Σ log p(continuation | context), greedy reproduces it)`` per request.

        Each sequence is ``(context + continuation)[-(max_length + 1):]``; the model reads all
        but its last token and the continuation's log-probabilities are read from the last
        ``len(continuation)`` positions (float32 log-softmax over the full padded vocabulary,
        summed in float64).
        """
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("every loglikelihood request needs a non-empty context and "
                                 f"continuation (got {len(context)} and {len(continuation)} "
                                 "tokens)")
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results: list[tuple[float, bool]] = []
        progress = tqdm(total=len(requests), desc="loglikelihood",
                        disable=disable_tqdm or not self._show_progress)
        for batch in collator.get_batched(n=self.config.batch_size):
            windows = [(ctx + cont)[-(self._max_length + 1):] for _, ctx, cont in batch]
            width = max(len(w) for w in windows) - 1
            inputs = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
            targets = torch.zeros_like(inputs)
            scored = torch.zeros_like(inputs, dtype=torch.bool)
            for row, (window, (_, _, cont)) in enumerate(zip(windows, batch, strict=True)):
                n = len(window) - 1
                inputs[row, :n] = torch.tensor(window[:-1])
                targets[row, :n] = torch.tensor(window[1:])
                scored[row, n - min(len(cont), n):n] = True
            logits = self._logits(inputs)
            targets, scored = targets.to(logits.device), scored.to(logits.device)
            logp = vocab_parallel_logprobs(logits, targets, mask=scored, tp_group=self._tp_group)
            greedy_ok = (self._greedy_tokens(logits) == targets) | ~scored
            for row, (request, _, _) in enumerate(batch):
                answer = (float(logp[row][scored[row]].double().sum()),
                          bool(greedy_ok[row].all()))
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over lm-eval's disjoint rolling windows of
        ``max_length`` tokens (each token predicted once; the first from ``prefix_token_id``)."""
        strings = [req.args[0] for req in requests]
        self.check_round_trip(strings)
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for i, string in enumerate(strings):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(strings)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm),
                                   strict=True):
            totals[i] += logp
        for string, total in zip(strings, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    # ------------------------------------------------------------------ generation

    def _greedy_decode(self, contexts: list[list[int]], max_new_tokens: int,
                       stop: list[str]) -> list[list[int]]:
        """Greedy continuations of token ``contexts`` from the rollout engine (KV cache).

        A row ends at EOS, after ``max_new_tokens`` or at ``max_length``; stop strings that are
        one token end it early too (longer ones are cut from the text afterwards, with the same
        result at more compute).
        """
        from nemo_opd.rollout.engine import SamplingParams
        from nemo_opd.rollout.megatron_engine import MegatronEngine

        stop_ids = {ids[0] for ids in (self.tok_encode(s, add_special_tokens=False)
                                       for s in stop if s) if len(ids) == 1}
        engine = MegatronEngine(self.model, pad_id=self._pad_id, eos_id=self.eot_token_id,
                                tp_group=self._tp_group, max_sequence_length=self._max_length)
        batch = engine.generate(contexts, SamplingParams(
            temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(sorted(stop_ids))))
        return [batch.tokens[row, len(ctx):int(batch.lengths[row])].tolist()
                for row, ctx in enumerate(contexts)]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy generations for ``(context, gen_kwargs)`` requests, cut at the first stop
        string (``until`` plus the EOS text). Sampling (``do_sample=True``) is refused."""
        args = [req.args for req in requests]
        self.check_round_trip(context for context, _ in args)
        for context, gen_kwargs in args:
            kwargs = normalize_gen_kwargs(gen_kwargs, self.config.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError(f"MegatronLM decodes greedily only; a request asks for sampling "
                                 f"with {gen_kwargs} (context {context[:60]!r})")
            if kwargs["max_gen_toks"] >= self._max_length:
                raise ValueError(f"max_gen_toks = {kwargs['max_gen_toks']} leaves no room for "
                                 f"the context in max_length = {self._max_length}")
        collator = Collator(args, sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str] = []
        progress = tqdm(total=len(args), desc="generate_until",
                        disable=disable_tqdm or not self._show_progress)
        for batch in collator.get_batched(n=self.config.batch_size):
            contexts, all_kwargs = zip(*batch, strict=True)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.config.max_gen_toks)
            stop = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            # Contexts keep their last max_length - max_new tokens (HFLM's left truncation); an
            # empty one starts from the prefix token, as an empty loglikelihood context does.
            encoded = [self.tok_encode(c)[-(self._max_length - max_new):] or [self.prefix_token_id]
                       for c in contexts]
            for context, gen_kwargs, tokens in zip(
                    contexts, all_kwargs, self._greedy_decode(encoded, max_new, stop), strict=True):
                text = postprocess_generated_text(self.tok_decode(tokens), stop, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)


def _as_bool(name: str, value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


@contextlib.contextmanager
def open_megatron_lm(pretrained: str | Path, *, tp: int = 1, dtype: str | None = None,
                     export: bool = False, config: LMConfig | None = None) -> Iterator[MegatronLM]:
    """A :class:`MegatronLM` over the checkpoint in ``pretrained`` for the block.

    Loads the HF directory (``export=True``: the ModelOpt export's dequantised copy) into a
    megatron ``GPTModel`` at TP = ``tp`` in ``dtype`` (None: the checkpoint's), with the
    tokenizer saved next to it. The runtime is brought up for the block unless one is already
    up (a recipe, a test), whose TP size must then be ``tp``. ``config.numerics`` None: derived
    from the model, ``"megatron dequantised bf16"`` for an export.
    """
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    from nemo_opd.eval.exported import plain_checkpoint
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    with contextlib.ExitStack() as stack:
        model_dir, dtype = stack.enter_context(plain_checkpoint(pretrained, export=export,
                                                                dtype=dtype))
        if parallel_state.model_parallel_is_initialized():
            # Inside a running job: use its runtime, whose layout must match; a process group
            # cannot be torn down and brought up again in one process.
            running = parallel_state.get_tensor_model_parallel_world_size()
            if running != tp:
                raise ValueError(f"tp = {tp} differs from the running job's tensor-parallel "
                                 f"size {running}")
        else:
            stack.enter_context(distributed_runtime(parallel))
        model = load_hf_gpt(model_dir, parallel, dtype=getattr(torch, dtype))
        config = config or LMConfig()
        if config.numerics is None:
            numerics = describe_numerics(model)
            if export:
                numerics = numerics.replace("megatron ", "megatron dequantised ", 1)
            config = dataclasses.replace(config, numerics=numerics)
        yield MegatronLM(model, AutoTokenizer.from_pretrained(model_dir), config)


def _snippet(text: str, at: int, width: int = 30) -> str:
    start = max(0, at - width)
    return repr(("..." if start else "") + text[start:at + width])
