"""Training data: prompt/response records, tokenization, resumable batches, λ mixing, replay."""

from nemo_opd.data.batch import SOURCES, SequenceBatch
from nemo_opd.data.iterator import EpochBatches
from nemo_opd.data.mixing import lambda_draw, step_rng
from nemo_opd.data.replay import ReplayBuffer
from nemo_opd.data.source import Example, PromptEncoder, encode_records, load_records

__all__ = [
    "SOURCES",
    "EpochBatches",
    "Example",
    "PromptEncoder",
    "ReplayBuffer",
    "SequenceBatch",
    "encode_records",
    "lambda_draw",
    "load_records",
    "step_rng",
]
