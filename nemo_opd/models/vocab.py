"""Vocabularies padded for tensor parallelism, and what keeps the padding out of every result.

megatron-core splits the embedding and the output layer into ``V_p / TP`` rows per rank, so a
vocabulary ``V`` that TP does not divide is padded to ``V_p`` (megatron's
``make_vocab_size_divisible_by``). The padded rows are zero in the embedding (no token id
reaches them) and their logits are set to :data:`PADDED_LOGIT` on the output layer itself,
so every consumer of the logits — sampling, log-probs, top-k, the divergences and lm-eval —
sees probability exactly 0 there (``exp(-1e4 - max)`` underflows in fp32), and no gradient
flows into them. A finite value rather than ``-inf``: the divergences compute
``p · (log p - log q)`` with ``p = q = 0`` there, which is 0 for finite logs and NaN for
infinite ones, and temperatures below 1 scale the value further.

Checkpoint import and export work on the HF shape: :class:`PaddedVocabImporter` pads the HF
rows on the way in; :func:`trim_padded_vocab` drops them from what ModelOpt's exporter writes
(:mod:`nemo_opd.quant.export`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from modelopt.torch.export.plugins.mcore_common import (
    all_mcore_hf_export_mapping,
    all_mcore_hf_import_mapping,
)
from modelopt.torch.export.plugins.megatron_importer import GPTModelImporter

from nemo_opd.console import is_verbose

__all__ = ["PADDED_LOGIT", "mask_padded_vocab", "PaddedVocabImporter", "trim_padded_vocab"]

PADDED_LOGIT = -1.0e4
"""The logit of every padded vocabulary entry."""


def mask_padded_vocab(model: torch.nn.Module, vocab_size: int) -> None:
    """Set the logits of ids ``>= vocab_size`` to :data:`PADDED_LOGIT` in ``model``'s output
    layer: a forward hook on this rank's vocab shard ``[s, b, V_p / TP]``, or on the whole
    ``[s, b, V_p]`` when megatron gathers the output (inference). A model whose output layer is
    another stage's, or whose vocabulary is not padded, is left alone."""
    output_layer = getattr(model, "output_layer", None)
    if output_layer is None or model.vocab_size == vocab_size:
        return
    tp_group = model.pg_collection.tp
    local = model.vocab_size // tp_group.size()
    first_id = tp_group.rank() * local
    # Built once per (width, device): decoding calls the hook once per token.
    masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def hook(_module, _inputs, output):
        logits, bias = output
        key = (logits.shape[-1], logits.device)
        if key not in masks:
            first = first_id if logits.shape[-1] == local else 0
            masks[key] = torch.arange(first, first + key[0], device=key[1]) >= vocab_size
        return logits.masked_fill(masks[key], PADDED_LOGIT), bias

    output_layer.register_forward_hook(hook)


class PaddedVocabImporter(GPTModelImporter):
    """ModelOpt's HF importer, with the embedding and output rows padded to the model's.

    ModelOpt slices an HF tensor into ``rows / TP`` for each rank and so needs ``TP | V``. For
    the two vocabulary tensors this reads the whole ``[V, h]`` tensor, appends zero rows up to
    ``V_p`` and gives this rank its slice; every other tensor goes through ModelOpt unchanged.
    """

    def __init__(self, model: torch.nn.Module, model_dir: str, *, dtype: torch.dtype) -> None:
        super().__init__(model, model_dir, dtype=dtype)
        # ModelOpt's per-layer import bars (rank 0) join the third-party bars nemo_opd.console
        # turns off unless verbose.
        self.disable_tqdm = self.disable_tqdm or not is_verbose()
        self._vocab_keys = _vocab_keys(all_mcore_hf_import_mapping[self.arch])
        self._padded_vocab_size = model.vocab_size

    def _get_safetensor(self, key, parallel_config=None):
        if key not in self._vocab_keys or self._padded_vocab_size == self._hf_config.vocab_size:
            return super()._get_safetensor(key, parallel_config)
        whole = super()._get_safetensor(key, None)
        padded = torch.cat([whole, whole.new_zeros(self._padded_vocab_size - whole.shape[0],
                                                   whole.shape[1])])
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return padded.chunk(tp)[parallel_state.get_tensor_model_parallel_rank()].contiguous()

    def import_weights(self) -> None:
        """Fill the model (ModelOpt's ``import_mcore_gpt_from_hf`` does the same two steps)."""
        self._import_state_dict()


def _vocab_keys(mapping: dict) -> set[str]:
    """HF names of the embedding and output weights in a ModelOpt import or export mapping."""
    return {mapping[name].target_name_or_prefix + "weight"
            for name in ("word_embeddings", "output_layer")}


def trim_padded_vocab(layer_state_dicts: dict[int, dict[str, torch.Tensor]], architecture: str,
                      vocab_size: int) -> None:
    """Cut the embedding and output rows in ModelOpt exporter's ``layer_state_dicts`` (HF names)
    back to ``vocab_size``, in place, so the exported checkpoint has the HF shape again."""
    keys = _vocab_keys(all_mcore_hf_export_mapping[architecture])
    for state in layer_state_dicts.values():
        for key in keys & state.keys():
            state[key] = state[key][:vocab_size]
