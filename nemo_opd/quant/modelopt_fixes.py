"""Fixes to ModelOpt 0.47 that nemo_opd needs, in one place, each with why and its test.

1. **GLU split of ``linear_fc1`` quantizer state in distributed checkpoints.**
   ``_MegatronMLP.sharded_state_dict`` (``modelopt/torch/opt/plugins/megatron.py``) must route
   ``linear_fc1``'s weight-quantizer ``_amax``/``_scale`` through megatron's
   ``apply_swiglu_sharded_factory`` (fc1 holds [gate; up] per TP rank, so its shards interleave).
   It tests its patterns (``weight_quantizer\\.(\\d+\\.)*_amax$``) with ``re.match``, which anchors
   at the start of the *full* key (``decoder.layers.0.mlp.linear_fc1.weight_quantizer._amax``),
   so the split never happens. A TP=2 INT8/INT4 checkpoint then restores at TP=1 *without error*
   and with logits off by 1.4 % / 4.3 % (ARCHITECTURE.md). The fix searches the patterns
   anywhere in the key, and leaves one-element (per-tensor, TP-replicated) tensors alone: they
   have no gate/up halves. Test: ``tests/test_quant_checkpoint.py`` (TP=2 -> TP=1 exact).

2. **``unified_export_megatron`` does not import with megatron-core 0.16.** It imports
   ``HybridModel`` from ``megatron.core.models.hybrid``, which megatron-core 0.16 does not have,
   so every export fails with ``NameError``. :func:`modelopt_exporter_class` registers
   megatron's ``MambaModel`` under that name and reloads the module. Test:
   ``tests/test_quant_export.py``.

(ModelOpt's CPU gap, an unconditional ``torch.cuda.synchronize()`` when saving, is handled with
the other CPU accommodations in :mod:`nemo_opd.runtime.cpu_backend`.)
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types

__all__ = ["apply_modelopt_fixes", "modelopt_exporter_class"]

_APPLIED = False


def _sharded_state_dict_with_glu_split(self, prefix="", sharded_offsets=(), metadata=None):
    from megatron.core.transformer import mlp as megatron_mlp
    from modelopt.torch.opt.plugins.megatron import _MegatronMLP

    metadata = {} if metadata is None else metadata
    metadata["singleton_local_shards"] = True
    sharded = super(_MegatronMLP, self).sharded_state_dict(prefix, sharded_offsets, metadata)
    if not self.config.gated_linear_unit:
        return sharded
    patterns = [re.compile(p) for p in self._modelopt_state_keys]
    for key, value in sharded.items():
        if ("linear_fc1" in key and any(p.search(key) for p in patterns)
                and value.local_shape and value.local_shape[0] > 1):
            sharded[key] = megatron_mlp.apply_swiglu_sharded_factory(
                value, sharded_offsets, metadata["singleton_local_shards"])
    return sharded


def apply_modelopt_fixes() -> None:
    """Apply the fix above (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from modelopt.torch.opt.plugins.megatron import _MegatronMLP

    _MegatronMLP.sharded_state_dict = _sharded_state_dict_with_glu_split
    _APPLIED = True


def modelopt_exporter_class() -> type:
    """ModelOpt's ``GPTModelExporter``, importable with megatron-core 0.16.

    ModelOpt 0.47's ``unified_export_megatron`` imports ``HybridModel`` from
    ``megatron.core.models.hybrid.hybrid_model``, the newer megatron name of ``MambaModel``;
    megatron-core 0.16 has only ``megatron.core.models.mamba``. The failed import stops ModelOpt's
    guarded import block half way, leaving ``LLaVAModel``, ``TransformerLayer``, ``IdentityOp``
    and the parallel-state getters undefined, and every export fails with ``NameError``. We
    register the old class under the new module name and re-run that module's imports (reload).
    Nothing else of ModelOpt or megatron changes; with a megatron that has the module this is a
    no-op.
    """
    from modelopt.torch.export import unified_export_megatron

    if hasattr(unified_export_megatron, "TransformerLayer"):
        return unified_export_megatron.GPTModelExporter
    if importlib.util.find_spec("megatron.core.models.hybrid") is None:
        from megatron.core.models.mamba.mamba_model import MambaModel

        package = types.ModuleType("megatron.core.models.hybrid")
        module = types.ModuleType("megatron.core.models.hybrid.hybrid_model")
        module.HybridModel = MambaModel
        package.hybrid_model = module
        sys.modules[package.__name__] = package
        sys.modules[module.__name__] = module
    unified_export_megatron = importlib.reload(unified_export_megatron)
    if not hasattr(unified_export_megatron, "TransformerLayer"):
        raise ImportError("ModelOpt's megatron exporter cannot import its megatron-core names "
                          "even with the HybridModel alias; check the installed versions")
    return unified_export_megatron.GPTModelExporter
