"""nemo_opd: on-policy distillation of quantization-aware-trained students on megatron-core."""

__version__ = "0.1.0"
