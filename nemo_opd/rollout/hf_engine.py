"""A Hugging Face ``transformers`` rollout engine, refit in place from the fake-quant student.

:class:`HFEngine` is an *external* engine that runs here (CPU or GPU): a separate
``AutoModelForCausalLM`` built once from the student's HF directory (its ``config.json``; no
weights are read from disk), whose parameters :meth:`HFEngine.update_weights` overwrites in place
after every optimizer step with the student's current **dequantised fake-quant weights** — per
quantized linear exactly what the student's forward multiplies by, ``weight_quantizer(weight)``
(+ unmerged LoRA adapters ``(alpha / r) B A``, + an AWQ/SmoothQuant ``pre_quant_scale`` folded into
the input columns). :func:`student_hf_tensors` does that conversion (megatron names → HF names,
TP shards gathered, the padded vocabulary trimmed); the TensorRT-LLM and vLLM engines send the
same tensors.

Why it exists: it is the smallest real engine with its *own* numerics, so the machinery external
engines need — weight refit, bad-input checks, and the importance weights that correct for an
engine whose log-probs differ from the trainer's — is exercised end to end on CPU. What differs
from the trainer's forward: activation (input / output / KV) quantizers are *not* reproduced (the
HF model runs its activations in ``dtype``), the engine may run in another dtype than the student
(e.g. bf16 next to an fp32 trainer), and HF's kernels sum in another order. With weight-only
formats in the student's dtype the log-probs agree to ~1e-6 (fp32) and greedy tokens are equal.

Semantics are :class:`~nemo_opd.rollout.megatron_engine.MegatronEngine`'s, by construction: the
same per-row decoding scheme (prefill to the shortest context, then one token per row per step —
the row's own context token while it lasts, else the sampled one; finished rows leave the KV
cache), the same sampler (:func:`~nemo_opd.rollout.sampling.sample_tokens`, rows drawn in the same
order from a generator seeded the same way), stop ids, ``min_new_tokens``, forced prefixes, ``n``
samples in row order ``prompt_index * n + sample_index``, both log-prob kinds, the same length
policy and input checks. Same weights + same seed → the same tokens as the megatron engine (up to
ties broken by ~1e-6 logit differences).

Tensor parallelism: with a TP > 1 student every TP rank gathers the full tensors and runs its own
full HF model; all ranks of the group sample the same tokens (same inputs checked by a
fingerprint, one seed, as the megatron engine). Pipeline parallelism is refused.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_opd.rollout.decode import RowDecoder, expand_rows, rollout_batch
from nemo_opd.rollout.engine import LogprobKind, RolloutBatch, SamplingParams
from nemo_opd.rollout.external import check_prompts

__all__ = ["HFEngine", "student_hf_tensors", "check_hf_tensors", "load_engine_tokenizer"]

logger = logging.getLogger(__name__)

# megatron linear (suffix inside decoder.layers.<i>.) -> its tensor-parallel split
_COLUMN = ("self_attention.linear_qkv", "mlp.linear_fc1")
_ROW = ("self_attention.linear_proj", "mlp.linear_fc2")
# norms (suffix inside decoder.layers.<i>.) -> HF name inside model.layers.<i>.; local-spec and
# Transformer-Engine (norm fused into the next linear) spellings
_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


_VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module style wrappers (``.module`` chains)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


# ---------------------------------------------------------------------- megatron -> HF tensors


def _effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """What ``module``'s forward multiplies its input by, as one ``[out, in]`` weight (this rank's
    shard): the fake-quantized weight, plus enabled LoRA adapters, times the input quantizer's
    pre-quant scale (applied to the input there, to the weight's columns here)."""
    weight = module._parameters["weight"].detach()
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None:  # a disabled ModelOpt quantizer passes its input through
        weight = quantizer(weight)
    adapters = getattr(module, "_lora_adapters", None) or {}
    if any(adapter["enable"] for adapter in adapters.values()):
        merged = weight.float()
        for adapter in adapters.values():
            if adapter["enable"]:
                merged = merged + adapter["scale"] * (adapter["lora_b"].weight.detach().float()
                                                      @ adapter["lora_a"].weight.detach().float())
        weight = merged.to(weight.dtype)
    scale = getattr(getattr(module, "input_quantizer", None), "pre_quant_scale", None)
    if scale is not None:
        weight = (weight.float() * scale.detach().float().reshape(1, -1)).to(weight.dtype)
    return weight


def _gather(tensor: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate the TP ranks' shards of ``tensor`` along ``dim`` (contiguous first: gloo
    sends wrong data for non-contiguous tensors)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _gather_glu(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``linear_fc1`` of a gated MLP: each rank holds ``[gate_shard; up_shard]``; the whole
    weight is ``[gate; up]``."""
    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([_gather(gate, 0, group), _gather(up, 0, group)], dim=0)


def _split_rows(suffix: str, tensor: torch.Tensor, config: Any) -> dict[str, torch.Tensor]:
    """A whole megatron linear tensor (weight or bias; output rows first) → HF projections."""
    if suffix == "self_attention.linear_qkv":
        # megatron interleaves per query group: [q (heads/group x head_dim), k, v] x groups
        groups = config.num_query_groups
        per_group = config.num_attention_heads // groups
        grouped = tensor.reshape(groups, per_group + 2, config.kv_channels, *tensor.shape[1:])
        rest = tensor.shape[1:]
        return {"self_attn.q_proj": grouped[:, :per_group].reshape(-1, *rest),
                "self_attn.k_proj": grouped[:, per_group].reshape(-1, *rest),
                "self_attn.v_proj": grouped[:, per_group + 1].reshape(-1, *rest)}
    if suffix == "mlp.linear_fc1":
        gate, up = tensor.chunk(2, dim=0)
        return {"mlp.gate_proj": gate, "mlp.up_proj": up}
    if suffix == "self_attention.linear_proj":
        return {"self_attn.o_proj": tensor}
    return {"mlp.down_proj": tensor}


@torch.no_grad()
def student_hf_tensors(model: torch.nn.Module, *, vocab_size: int | None = None,
                       tp_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """The student's current weights as the full tensors of its Hugging Face model.

    Args:
        model: a megatron-core ``GPTModel`` (or a DDP-style wrapper) of the Llama / Qwen2 / Qwen3
            dense layout, quantized or not, with or without LoRA adapters; PP = 1.
        vocab_size: the HF vocabulary; embedding and output rows beyond it (megatron's TP
            padding) are dropped. None: keep them.
        tp_group: the model's TP group (collective: every rank of it must call); None: the
            model's own.

    Returns:
        HF name → tensor (``model.layers.0.self_attn.q_proj.weight`` …) in the student's dtype,
        on its device: quantized linears dequantised (``weight_quantizer(weight)``, what the
        fake-quant forward computes with), LoRA adapters folded in. A tied output layer has no
        ``lm_head.weight`` entry (HF ties it to ``model.embed_tokens.weight``).

    Raises:
        NotImplementedError: a parameter with no HF counterpart here (MoE experts, an unknown
            layer), or pipeline parallelism.
    """
    gpt = _unwrap(model)
    if not getattr(gpt, "pre_process", True) or not getattr(gpt, "post_process", True):
        raise NotImplementedError("student_hf_tensors needs the whole model on this rank "
                                  "(pipeline parallelism is not supported)")
    if tp_group is None:
        tp_group = gpt.pg_collection.tp
    config = gpt.config
    if getattr(config, "gated_linear_unit", True) is False:
        raise NotImplementedError("student_hf_tensors maps gated (SwiGLU) MLPs only")
    out: dict[str, torch.Tensor] = {}
    modules = dict(gpt.named_modules())
    for name, param in gpt.named_parameters():
        if ".lora_" in name:  # folded into their base linear's weight
            continue
        owner, _, leaf = name.rpartition(".")
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = _gather(param.detach(), 0, tp_group)
        elif name == "output_layer.weight":
            out["lm_head.weight"] = _gather(_effective_weight(modules[owner]), 0, tp_group)
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = param.detach()
        elif name.startswith("decoder.layers."):
            index, _, suffix = name.removeprefix("decoder.layers.").partition(".")
            prefix = f"model.layers.{index}."
            linear = suffix.rpartition(".")[0]
            if suffix in _NORMS:
                out[prefix + _NORMS[suffix]] = param.detach()
            elif linear in _COLUMN + _ROW and leaf in ("weight", "bias"):
                value = (_effective_weight(modules[owner]) if leaf == "weight"
                         else param.detach())
                if linear == "mlp.linear_fc1":
                    value = _gather_glu(value, tp_group)
                elif linear in _COLUMN:
                    value = _gather(value, 0, tp_group)
                elif leaf == "weight":  # row-parallel: input columns are split, bias is not
                    value = _gather(value, 1, tp_group)
                for projection, tensor in _split_rows(linear, value, config).items():
                    out[f"{prefix}{projection}.{leaf}"] = tensor
            else:
                raise NotImplementedError(
                    f"student_hf_tensors maps dense Llama/Qwen2/Qwen3 layers; the student's "
                    f"parameter {name} has no Hugging Face counterpart here")
        else:
            raise NotImplementedError(f"student_hf_tensors: the student's parameter {name} has "
                                      "no Hugging Face counterpart here")
    if vocab_size is not None:
        for key in _VOCAB_KEYS:
            if key in out:
                # Only megatron's TP padding may be cut: its rows are zero (no token reaches the
                # embedding's, the output's get no gradient); a real token's row is not.
                cut = out[key][vocab_size:]
                if cut.numel() and bool((cut != 0).any()):
                    raise ValueError(
                        f"the engine's vocabulary has {vocab_size} entries but the student's "
                        f"{key} has {out[key].shape[0]} rows whose rows >= {vocab_size} are real "
                        "tokens (not TP padding): the engine's model and tokenizer are not the "
                        "student's")
                out[key] = out[key][:vocab_size]
    return {key: value.contiguous() for key, value in out.items()}


def check_hf_tensors(source: dict[str, torch.Tensor], target: dict[str, tuple[int, ...]],
                     *, engine: str) -> None:
    """Raise ``ValueError`` unless ``source`` (name → tensor) fills exactly the tensors named in
    ``target`` (name → shape) with the same shapes; the message names every difference."""
    problems = []
    missing = sorted(target.keys() - source.keys())
    extra = sorted(source.keys() - target.keys())
    if missing:
        problems.append(f"the student has no tensor for {len(missing)} of the engine's "
                        f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    if extra:
        problems.append(f"the engine has no parameter for {len(extra)} of the student's tensors "
                        f"({', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''})")
    shapes = [f"{key}: student {tuple(source[key].shape)} vs engine {tuple(target[key])}"
              for key in sorted(source.keys() & target.keys())
              if tuple(source[key].shape) != tuple(target[key])]
    vocab = [key for key in _VOCAB_KEYS if key in source and key in target
             and source[key].shape[0] != target[key][0]]
    if vocab:
        problems.append(f"the vocabularies differ: the student has {source[vocab[0]].shape[0]} "
                        f"token rows, the engine's model {target[vocab[0]][0]}")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ ({'; '.join(shapes[:4])}"
                        f"{' ...' if len(shapes) > 4 else ''})")
    if problems:
        raise ValueError(f"{engine} weight refit: the student's weights do not fit the engine's "
                         f"model — {'; '.join(problems)}. Build the engine from the student's own "
                         "HF directory (cfg.model.student).")


def load_engine_tokenizer(model_dir: str | Path):
    """The tokenizer saved in ``model_dir``, or None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------------- the engine


class HFEngine:
    """Generate rollouts with a Hugging Face model refit from the student (module docstring).

    Args:
        model: the student ``GPTModel`` (or a DDP-style wrapper); its current weights are copied
            in at construction and on every :meth:`update_weights`.
        hf_dir: the student's HF directory; its ``config.json`` shapes the HF model (no weights
            are read), its tokenizer (if any) is the engine's :attr:`tokenizer`.
        pad_id: id filling the right padding of :attr:`RolloutBatch.tokens`.
        eos_id: id that ends a row (added to every call's stop ids); None: only the call's.
        tp_group: the student's TP group; None: the model's own.
        dtype: the HF model's parameter dtype; None: the student's. Another dtype (bf16 next to
            an fp32 trainer) makes the engine's log-probs differ from the trainer's.
        max_sequence_length: most positions per row; None: the HF config's
            ``max_position_embeddings``.
        attn_implementation: HF attention kernel ("sdpa", "eager", ...).
    """

    logprob_kinds: tuple[LogprobKind, ...] = ("sampling", "raw")
    """Both kinds, as requested per call (greedy records ``"raw"``)."""
    returns_logprobs = True

    def __init__(self, model: torch.nn.Module, hf_dir: str | Path, *, pad_id: int,
                 eos_id: int | None, tp_group: dist.ProcessGroup | None = None,
                 dtype: torch.dtype | None = None, max_sequence_length: int | None = None,
                 attn_implementation: str = "sdpa") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from nemo_opd.quant.student import enabled_quantizers

        gpt = _unwrap(model)
        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"HFEngine: {hf_dir} has no config.json (the student's HF "
                                    "directory, cfg.model.student)")
        first = next(gpt.parameters())
        self.device = first.device
        self.dtype = dtype or first.dtype
        self.tp_group = tp_group if tp_group is not None else gpt.pg_collection.tp
        config = AutoConfig.from_pretrained(str(hf_dir))
        self.vocab_size: int = config.vocab_size
        for name, value in (("pad_id", pad_id), ("eos_id", eos_id)):
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be an id in [0, {self.vocab_size}), got {value!r}")
        limit = (config.max_position_embeddings if max_sequence_length is None
                 else max_sequence_length)
        if not isinstance(limit, int) or limit < 2:
            raise ValueError(f"max_sequence_length must be an int >= 2, got {limit!r}")
        self.pad_id, self.eos_id, self.max_sequence_length = pad_id, eos_id, limit
        self.hf_dir = hf_dir
        with torch.device(self.device):
            self.hf_model = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, attn_implementation=attn_implementation)
        self.hf_model.eval().requires_grad_(False)
        self._targets = dict(self.hf_model.named_parameters())
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x; the old name is removed in
        # 5.40): pass whichever this version's forward takes.
        self._cache_kwarg = ("cache" if "cache" in inspect.signature(self.hf_model.forward)
                             .parameters else "past_key_values")
        self.tokenizer = load_engine_tokenizer(hf_dir)
        activations = [n for kind in ("input", "output") for n in enabled_quantizers(gpt)[kind]]
        if activations:
            logger.warning("HFEngine: the student fake-quantizes activations (%d quantizers, e.g. "
                           "%s); the HF engine runs them in %s, so its log-probs differ from the "
                           "trainer's (the importance weights correct for it)", len(activations),
                           activations[0], self.dtype)
        self.update_weights(model)

    # ------------------------------------------------------------------ refit

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current dequantised fake-quant weights into the HF parameters, in
        place (no reallocation, no disk). Collective over the TP group.

        Raises:
            ValueError: the student's tensors do not match the engine's parameters (names or
                shapes); nothing is copied then.
        """
        tensors = student_hf_tensors(model, vocab_size=self.vocab_size, tp_group=self.tp_group)
        check_hf_tensors(tensors, {k: tuple(p.shape) for k, p in self._targets.items()},
                         engine="HFEngine")
        for name, tensor in tensors.items():
            self._targets[name].copy_(tensor)

    # ------------------------------------------------------------------ checks

    def _agree_across_tp(self, prompts: list[list[int]], prefixes: list[list[int]] | None,
                         params: SamplingParams) -> int:
        """The sampling seed, after checking every TP rank asked for the same rollouts (the
        megatron engine's rule: one fingerprint all-gathered; seed None → the first rank's)."""
        own_seed = (params.seed if params.seed is not None
                    else int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            return own_seed
        digest = hashlib.sha256(repr((prompts, prefixes, params)).encode()).digest()
        mine = torch.tensor([int.from_bytes(digest[:7], "little"), own_seed], dtype=torch.int64,
                            device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.tp_group))]
        dist.all_gather(gathered, mine, group=self.tp_group)
        if any(int(g[0]) != int(mine[0]) for g in gathered):
            raise ValueError("HFEngine.generate was called with different prompts, prefixes or "
                             "sampling params on the ranks of one TP group; every TP rank must "
                             "ask for the same rollouts")
        return int(gathered[0][1])

    # ------------------------------------------------------------------ generation

    def _next_logits(self, cache: Any, tokens: torch.Tensor, rows: torch.Tensor, start: int,
                     end: int) -> torch.Tensor:
        """``[k, V]`` float32 logits predicting position ``end`` for ``rows`` (the cache's
        rows, in order), feeding positions ``[start, end)``."""
        ids = tokens[rows, start:end]
        positions = torch.arange(start, end, device=ids.device).expand_as(ids)
        out = self.hf_model(input_ids=ids, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1].float()

    @torch.no_grad()
    def _generate_rows(self, contexts: list[list[int]], prefix_stopped: torch.Tensor,
                       params: SamplingParams, stop_ids: list[int], seed: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  LogprobKind]:
        """Tokens, log-probs, lengths, stopped and the log-prob kind of rows continuing
        ``contexts`` (the megatron engine's loop, on an HF ``DynamicCache``)."""
        from transformers import DynamicCache

        state = RowDecoder.start(contexts, prefix_stopped, params, stop_ids, seed,
                                 pad_id=self.pad_id,
                                 max_sequence_length=self.max_sequence_length, device=self.device)
        cache = DynamicCache(config=self.hf_model.config)
        # live = the rows still generating, ascending (the cache holds exactly these rows, in
        # this order) — the order in which the megatron engine draws them too.
        live = torch.nonzero(~state.done).squeeze(1)
        position = int(state.context_lengths.min())
        fed = 0
        while live.numel():
            logits = self._next_logits(cache, state.tokens, live, fed, position)
            fed = position
            state.step(logits, live, position, params)
            position += 1
            keep = ~state.done[live]
            if not keep.all():
                live = live[keep]
                if live.numel():
                    cache.batch_select_indices(torch.nonzero(keep).squeeze(1))
        return state.result()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 forced_prefixes: list[list[int]] | None = None) -> RolloutBatch:
        """``params.n`` continuations of each prompt (after its forced prefix, if any); see
        :class:`~nemo_opd.rollout.engine.RolloutEngine`."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        started = time.perf_counter()
        seed = self._agree_across_tp(prompts, forced_prefixes, params)
        prefixes = check_prompts(prompts, forced_prefixes, vocab_size=self.vocab_size,
                                 max_sequence_length=self.max_sequence_length)
        expanded, stop_ids, prefix_stopped = expand_rows(prompts, prefixes, params, self.eos_id,
                                                         self.device)
        result = self._generate_rows([p + q for p, q in expanded], prefix_stopped, params,
                                     stop_ids, seed)
        batch = rollout_batch(expanded, result, params, pad_id=self.pad_id, started=started,
                              device=self.device)
        logger.debug("HF engine: %d tokens in %.3f s (%.1f tokens/s)", batch.num_generated_tokens,
                     batch.generation_seconds, batch.tokens_per_second)
        return batch
