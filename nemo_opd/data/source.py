"""Prompt/response records from local files or a ``datasets`` hub name, and their tokenization.

:func:`load_records` reads ``.jsonl`` / ``.json`` / ``.parquet`` files (or a hub dataset) with
``datasets`` and checks the configured columns exist. :class:`PromptEncoder` turns one record into
token ids:

* prompt: the tokenizer's chat template (one user turn, generation prompt added) when
  ``DataConfig.chat_template`` is on and the tokenizer has a template; otherwise the plain text;
* response: its text tokenized without special tokens, then the EOS id (so the student learns to
  stop), cut at ``max_response_length``;
* overlong prompts (more than ``max_prompt_length`` tokens): ``"truncate_left"`` keeps the last
  ``max_prompt_length`` tokens (the end of a prompt, where the question and the generation prompt
  sit, matters most; counted in one warning), ``"drop"`` skips the record (counted),
  ``"error"`` raises naming it;
* an empty file, or a JSONL line that is not a JSON object, raises naming the file and line;
* an empty prompt (no text, or no tokens) raises ``ValueError`` naming the record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemo_opd.config import DataConfig

if TYPE_CHECKING:
    import datasets

__all__ = ["Example", "PromptEncoder", "load_records", "encode_records"]

logger = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized record."""

    index: int
    """Row of the record in the loaded dataset (stable across runs: the resume/caching key)."""
    prompt_ids: tuple[int, ...]
    """Prompt token ids (chat template applied), non-empty."""
    response_ids: tuple[int, ...]
    """Reference response ids ending in EOS unless cut; empty when the data has no responses."""


def load_records(cfg: DataConfig) -> datasets.Dataset:
    """The training records as a ``datasets.Dataset``; raises before tokenizing anything if a
    file is missing, has an unknown extension, or lacks the prompt/response columns."""
    import datasets

    if cfg.train_files:
        suffixes = {Path(f).suffix for f in cfg.train_files}
        for path in cfg.train_files:
            if not Path(path).is_file():
                raise FileNotFoundError(f"DataConfig.train_files: {path} does not exist")
        if len(suffixes) != 1 or next(iter(suffixes)) not in _FORMATS:
            raise ValueError(f"DataConfig.train_files must all be one of {tuple(_FORMATS)}, got "
                             f"{list(cfg.train_files)}")
        for path in cfg.train_files:
            _check_not_empty(Path(path))
        records = datasets.load_dataset(_FORMATS[suffixes.pop()], data_files=list(cfg.train_files),
                                        split="train")
    else:
        records = datasets.load_dataset(cfg.hub_name, split=cfg.split)
    needed = [cfg.prompt_field] + ([cfg.response_field] if cfg.response_field else [])
    missing = [c for c in needed if c not in records.column_names]
    if missing:
        raise ValueError(f"training data has no column(s) {missing}; it has "
                         f"{records.column_names} (set DataConfig.prompt_field/response_field)")
    if len(records) == 0:
        raise ValueError("training data is empty")
    return records


def _check_not_empty(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` (and the line, for JSONL) when it holds no records
    or a line that is not a JSON object: ``datasets`` reports both without the file's name."""
    if path.stat().st_size == 0:
        raise ValueError(f"DataConfig.train_files: {path} is empty")
    if path.suffix != ".jsonl":
        return
    records = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"DataConfig.train_files: {path} line {number} is not JSON "
                                 f"({err.msg} at column {err.colno}): {line[:80]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"DataConfig.train_files: {path} line {number} is not a JSON "
                                 f"object: {line[:80]!r}")
            records += 1
    if not records:
        raise ValueError(f"DataConfig.train_files: {path} holds no records (blank lines only)")


class PromptEncoder:
    """Tokenizes records the same way for the student, the rollout engine and the teacher."""

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; responses could not end")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.uses_chat_template = bool(cfg.chat_template and getattr(tokenizer, "chat_template",
                                                                     None))
        self.truncated = 0
        """Prompts cut to their last ``max_prompt_length`` tokens so far."""

    def prompt_ids(self, text: str) -> list[int]:
        """Prompt ids before the length policy."""
        if self.uses_chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=True)
            # transformers 5 returns a BatchEncoding here, 4.x a plain list
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        """Plain ids of ``text`` (no template, no special tokens): few-shot teacher context."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, index: int, prompt: Any, response: Any = None) -> Example | None:
        """The :class:`Example` for one record, or None when ``overlong="drop"`` skips it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"record {index}: empty prompt ({self.cfg.prompt_field}={prompt!r})")
        ids = self.prompt_ids(prompt)
        if not ids:
            raise ValueError(f"record {index}: prompt {prompt[:60]!r} has no tokens")
        limit = self.cfg.max_prompt_length
        if len(ids) > limit:
            if self.cfg.overlong == "error":
                raise ValueError(f"record {index}: prompt has {len(ids)} tokens > "
                                 f"DataConfig.max_prompt_length = {limit} (overlong='error')")
            if self.cfg.overlong == "drop":
                return None
            ids = ids[-limit:]
            self.truncated += 1
        response_ids: list[int] = []
        if response is not None:
            if not isinstance(response, str):
                raise ValueError(f"record {index}: response must be text, got {response!r}")
            response_ids = self.text_ids(response) + [self.tokenizer.eos_token_id]
            response_ids = response_ids[:self.cfg.max_response_length]
        return Example(index, tuple(ids), tuple(response_ids))


def encode_records(records: datasets.Dataset, encoder: PromptEncoder) -> list[Example]:
    """Tokenize every record (dropped overlong ones are counted in a log line)."""
    cfg = encoder.cfg
    responses = records[cfg.response_field] if cfg.response_field else [None] * len(records)
    prompts = records[cfg.prompt_field]
    examples = [encoder.encode(i, p, r)
                for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
    kept = [e for e in examples if e is not None]
    if encoder.truncated:
        logger.warning("truncated %d of %d prompts to their last max_prompt_length=%d tokens "
                       "(DataConfig.overlong='truncate_left'; 'drop' skips them, 'error' stops)",
                       encoder.truncated, len(examples), cfg.max_prompt_length)
    if len(kept) < len(examples):
        logger.warning("dropped %d of %d records with prompts over max_prompt_length=%d",
                       len(examples) - len(kept), len(examples), cfg.max_prompt_length)
    if not kept:
        raise ValueError(f"every record was dropped (prompts over max_prompt_length="
                         f"{cfg.max_prompt_length}, overlong='drop')")
    return kept
