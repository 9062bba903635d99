"""nemo_opd: on-policy distillation of quantization-aware-trained students on megatron-core."""

from nemo_opd.console import filter_known_warnings

__version__ = "0.1.0"

# Before megatron-core or ModelOpt is imported: they warn at import time (nemo_opd.console).
filter_known_warnings()
