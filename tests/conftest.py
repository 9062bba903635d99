"""Shared fixtures: one thread per process, tiny HF model directories built once per session."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nemo_opd.models.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, str]:
    """``{"llama": dir, "qwen3": dir}``: tiny random HF checkpoints written with save_pretrained."""
    from nemo_opd.models.tiny import TINY_FAMILIES, make_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: str(make_tiny_hf_model(root / family, family, seed=i, tokenizer=tiny_tokenizer))
            for i, family in enumerate(TINY_FAMILIES)}


@pytest.fixture(scope="session")
def tiny_moe_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny Qwen3-MoE: 3 layers, the middle one dense (``mlp_only_layers``), 4 experts of
    width 32, top-2 renormalised, head_dim 24 != hidden / heads."""
    from nemo_opd.models.tiny import MOE_FAMILY, TinyModelSpec, make_tiny_hf_model

    spec = TinyModelSpec(num_hidden_layers=3, head_dim=24, mlp_only_layers=(1,))
    root = tmp_path_factory.mktemp("tiny_moe")
    return str(make_tiny_hf_model(root / MOE_FAMILY, MOE_FAMILY, spec, seed=5,
                                  tokenizer=tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_quant_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny Qwen3 wide enough for INT4 block 128 at TP=2 (every local input dim % 128 == 0)."""
    from nemo_opd.models.tiny import TinyModelSpec, make_tiny_hf_model

    spec = TinyModelSpec(hidden_size=256, intermediate_size=512)
    root = tmp_path_factory.mktemp("tiny_quant")
    return str(make_tiny_hf_model(root / "qwen3_256", "qwen3", spec, seed=3,
                                  tokenizer=tiny_tokenizer))


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> str:
    """16 prompt/response pairs of a tiny arithmetic task (jsonl), for trainer tests."""
    path = tmp_path_factory.mktemp("train_data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"question: what is {i} plus {i % 5}?",
                                "response": f"answer: {i + i % 5}"}) + "\n")
    return str(path)
