"""Model weights + ModelOpt quantizer state in megatron-core distributed checkpoints.

``save_model_checkpoint(model, dir)`` writes ModelOpt's mode state (``dir/modelopt_state``) and
the model's sharded state dict (weights and, as ``_extra_state``, every quantizer's amax/scales)
with ``megatron.core.dist_checkpointing``. ``load_model_checkpoint(model, dir)`` takes a freshly
built, *unquantized* model of the same architecture at any TP/PP layout, re-inserts the
quantizers from the saved ModelOpt state (the checkpoint's per-layer keys only exist on a
quantized model), then loads the sharded weights, resharding as needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from nemo_opd.quant.modelopt_fixes import apply_modelopt_fixes

__all__ = ["save_model_checkpoint", "load_model_checkpoint"]

logger = logging.getLogger(__name__)


def save_model_checkpoint(model: torch.nn.Module, directory: str | Path) -> None:
    """Save ``model`` (quantized or not) to ``directory`` (collective: every rank calls it)."""
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from nemo_opd.train.preemption import preemption_signals_blocked

    apply_modelopt_fixes()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first: megatron's save takes a non-empty directory without metadata.json for a
    # crashed save and logs that it overwrites it; ModelOpt's state goes in a subdirectory after.
    # Signals blocked: megatron's writer processes must survive a signal to the process group.
    with preemption_signals_blocked():
        dist_checkpointing.save(model.sharded_state_dict(), str(directory))
        save_sharded_modelopt_state([model], str(directory))


def load_model_checkpoint(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """Load ``directory`` into ``model`` (in place, quantizers restored first); return it."""
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import (
        restore_sharded_modelopt_state,
    )

    import nemo_opd.quant.cpu_backend  # noqa: F401  registers the backend MX/NVFP4 state names

    apply_modelopt_fixes()
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory} is not a megatron distributed checkpoint "
                                "(no metadata.json)")
    models = [model]
    restore_sharded_modelopt_state(models, str(directory))
    model = models[0]
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state)
    logger.info("loaded %s", directory)
    return model
