"""Tiny Llama- and Qwen3-style models with a locally trained tokenizer, written to disk.

``make_tiny_hf_model(path, family="llama")`` writes what a user would point nemo_opd at: an HF
``config.json`` + ``model.safetensors`` from ``save_pretrained`` and a byte-level BPE tokenizer
trained here with ``tokenizers`` (no hub). Every test and the built-in demo start from these.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

__all__ = ["TinyModelSpec", "TINY_FAMILIES", "MOE_FAMILY", "make_tiny_tokenizer",
           "make_tiny_hf_model", "synthetic_corpus"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. Defaults fit TP=2 (heads, KV heads, vocab, ffn all even)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    vocab_multiple: int = 128
    """The model's vocab is the tokenizer's rounded up to this (as real models pad theirs)."""
    head_dim: int | None = None
    """Per-head width; ``hidden_size / num_attention_heads`` when None."""
    num_experts: int = 4
    """``qwen3_moe``: routed experts per MoE layer."""
    experts_per_token: int = 2
    """``qwen3_moe``: experts each token goes to."""
    moe_intermediate_size: int = 32
    """``qwen3_moe``: width of each expert."""
    mlp_only_layers: tuple[int, ...] = ()
    """``qwen3_moe``: layers that keep the dense MLP."""
    norm_topk_prob: bool = True
    """``qwen3_moe``: renormalise the top-k routing probabilities."""


TINY_FAMILIES = ("llama", "qwen3")
"""The dense families every test suite builds."""
MOE_FAMILY = "qwen3_moe"
"""The mixture-of-experts family (a Qwen3-30B-A3B-shaped teacher in miniature)."""

_WORDS = ("the a one two three four five six seven eight nine ten cat dog bird fish red blue green "
          "small big fast slow runs sees eats likes has is and or not plus minus equals answer "
          "question what which how many sum of to from in on").split()


def synthetic_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic toy text: word salad plus small arithmetic, enough to train a BPE."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 3 == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"question: what is {a} plus {b}? answer: {a + b}")
        else:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))))
    return lines


def make_tiny_tokenizer(vocab_size: int = 384, seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :func:`synthetic_corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<pad>")


def _hf_config(family: str, spec: TinyModelSpec, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim, architectures=["Qwen3ForCausalLM"])
    if family == MOE_FAMILY:
        return Qwen3MoeConfig(
            **common, head_dim=head_dim, num_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.moe_intermediate_size,
            mlp_only_layers=list(spec.mlp_only_layers), norm_topk_prob=spec.norm_topk_prob,
            decoder_sparse_step=1, architectures=["Qwen3MoeForCausalLM"])
    raise ValueError(f"unknown tiny family {family!r}; choose from {(*TINY_FAMILIES, MOE_FAMILY)}")


def make_tiny_hf_model(path: str | Path, family: str = "llama", spec: TinyModelSpec | None = None,
                       *, seed: int = 0, tokenizer=None) -> Path:
    """Write a random tiny ``family`` model and its tokenizer to ``path``; return ``path``.

    Weights are drawn with ``torch.manual_seed(seed)`` (deterministic); norms get random scales
    too so a wrong norm mapping cannot go unnoticed in comparisons.
    """
    from transformers import AutoModelForCausalLM

    spec = spec or TinyModelSpec()
    path = Path(path)
    tokenizer = tokenizer or make_tiny_tokenizer(seed=seed)
    vocab = -(-len(tokenizer) // spec.vocab_multiple) * spec.vocab_multiple
    config = _hf_config(family, spec, vocab, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
