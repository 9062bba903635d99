"""Training data: loading, tokenization policies, resumable batches, λ draws, replay buffer."""

from __future__ import annotations

import json
import random

import pytest
import torch

from nemo_opd.config import DataConfig
from nemo_opd.data import (
    EpochBatches,
    Example,
    PromptEncoder,
    ReplayBuffer,
    SequenceBatch,
    encode_records,
    lambda_draw,
    load_records,
)

RECORDS = [{"prompt": f"question: what is {i} plus {i}?", "response": f"answer: {2 * i}"}
           for i in range(10)]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_files_jsonl_and_parquet_agree(tmp_path):
    import datasets

    jsonl = _write_jsonl(tmp_path / "train.jsonl", RECORDS)
    parquet = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list(RECORDS).to_parquet(parquet)
    for files in ((jsonl,), (parquet,)):
        records = load_records(DataConfig(train_files=files))
        assert records["prompt"] == [r["prompt"] for r in RECORDS]
        assert records["response"] == [r["response"] for r in RECORDS]


def test_bad_files_and_columns_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_records(DataConfig(train_files=(str(tmp_path / "missing.jsonl"),)))
    path = _write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt', 'response'\]"):
        load_records(DataConfig(train_files=(path,)))
    with pytest.raises(ValueError, match=r"DataConfig.overlong must be one of .* got 'cut'"):
        DataConfig(train_files=(path,), overlong="cut")
    with pytest.raises(ValueError, match="DataConfig.train_files must be non-empty"):
        DataConfig()


def test_plain_encoding_matches_tokenizer(tiny_tokenizer):
    encoder = PromptEncoder(tiny_tokenizer, DataConfig(train_files=("x.jsonl",)))
    assert not encoder.uses_chat_template  # the tiny tokenizer has no template
    example = encoder.encode(3, "what is 1 plus 2?", "answer: 3")
    assert list(example.prompt_ids) == tiny_tokenizer.encode("what is 1 plus 2?",
                                                            add_special_tokens=False)
    assert list(example.response_ids) == tiny_tokenizer.encode(
        "answer: 3", add_special_tokens=False) + [tiny_tokenizer.eos_token_id]
    assert example.index == 3


def test_chat_template_is_applied(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                         "<|im_start|>assistant\n{% endif %}")
    encoder = PromptEncoder(tok, DataConfig(train_files=("x.jsonl",)))
    assert encoder.uses_chat_template
    rendered = "<|im_start|>user\nwhat is 1 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    assert list(encoder.encode(0, "what is 1 plus 2?").prompt_ids) == tok.encode(
        rendered, add_special_tokens=False)
    plain = PromptEncoder(tok, DataConfig(train_files=("x.jsonl",), chat_template=False))
    assert list(plain.encode(0, "hi there").prompt_ids) == tok.encode("hi there",
                                                                       add_special_tokens=False)


def test_overlong_policies_and_empty_prompts(tiny_tokenizer):
    long_prompt = " ".join(["seven"] * 40)
    ids = tiny_tokenizer.encode(long_prompt, add_special_tokens=False)
    assert len(ids) > 10

    def cfg(policy: str) -> DataConfig:
        return DataConfig(train_files=("x.jsonl",), max_prompt_length=10, overlong=policy,
                          max_response_length=3)

    truncated = PromptEncoder(tiny_tokenizer, cfg("truncate_left")).encode(0, long_prompt,
                                                                           "a b c d")
    assert list(truncated.prompt_ids) == ids[-10:]  # the end of the prompt is kept
    assert len(truncated.response_ids) == 3  # responses are cut at max_response_length
    assert PromptEncoder(tiny_tokenizer, cfg("drop")).encode(0, long_prompt) is None
    with pytest.raises(ValueError, match=r"record 5: prompt has \d+ tokens > .*= 10"):
        PromptEncoder(tiny_tokenizer, cfg("error")).encode(5, long_prompt)
    encoder = PromptEncoder(tiny_tokenizer, cfg("drop"))
    for empty in ("", "   ", None):
        with pytest.raises(ValueError, match="record 2: empty prompt"):
            encoder.encode(2, empty)

    import datasets

    records = datasets.Dataset.from_list([{"prompt": long_prompt, "response": "x"},
                                          {"prompt": "short one", "response": "y"}])
    kept = encode_records(records, encoder)
    assert [e.index for e in kept] == [1]
    with pytest.raises(ValueError, match="every record was dropped"):
        encode_records(records.select([0]), encoder)


def test_epoch_batches_are_seeded_permutations_and_resume():
    items = list(range(10))
    batches = EpochBatches(items, 3, seed=5)
    taken = [batches.next_batch() for _ in range(6)]  # 3 batches per epoch (tail of 1 skipped)
    for epoch in (taken[:3], taken[3:]):
        flat = sum(epoch, [])
        assert len(set(flat)) == 9 and set(flat) <= set(items)
    order = list(range(10))
    random.Random("5/epoch/0").shuffle(order)  # independent reference of the documented order
    assert sum(taken[:3], []) == order[:9]
    assert taken[:3] != taken[3:6]  # a new order each epoch

    restarted = EpochBatches(items, 3, seed=5)
    mid = EpochBatches(items, 3, seed=5)
    for _ in range(4):
        mid.next_batch()
    restarted.load_state_dict(mid.state_dict())
    assert [restarted.next_batch() for _ in range(5)] == [mid.next_batch() for _ in range(5)]
    other_seed = EpochBatches(items, 3, seed=6)
    assert [other_seed.next_batch() for _ in range(3)] != taken[:3]

    # Data-parallel ranks take disjoint slices of the same global batch.
    ranks = [EpochBatches(items, 2, seed=5, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(4):
        a, b = (r.next_batch() for r in ranks)
        assert not set(a) & set(b)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        EpochBatches(items[:3], 2, seed=0, dp_size=2)


def test_lambda_draws():
    assert not any(lambda_draw(0.0, seed=1, step=s) for s in range(200))
    assert all(lambda_draw(1.0, seed=1, step=s) for s in range(200))
    draws = [lambda_draw(0.25, seed=1, step=s, micro_batch=m) for s in range(500)
             for m in range(4)]
    # binomial(2000, 0.25): sd ≈ 0.0097; ±5 sd
    assert abs(sum(draws) / len(draws) - 0.25) < 0.05
    assert draws == [lambda_draw(0.25, seed=1, step=s, micro_batch=m) for s in range(500)
                     for m in range(4)]
    assert draws != [lambda_draw(0.25, seed=2, step=s, micro_batch=m) for s in range(500)
                     for m in range(4)]
    with pytest.raises(ValueError, match="lmbda must be in"):
        lambda_draw(1.5, seed=0, step=0)


def test_sequence_batch_masks_responses_and_round_trips():
    examples = [Example(0, (5, 6, 7), (8, 9, 2)), Example(4, (5,), (10, 2))]
    batch = SequenceBatch.from_examples(examples, pad_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9, 2], [5, 10, 2, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[False, False, False, True, True, True],
                                        [False, True, True, False, False, False]]
    assert batch.example_indices == (0, 4) and batch.num_loss_tokens == 5
    with pytest.raises(ValueError, match="needs reference responses"):
        SequenceBatch.from_examples([Example(1, (5,), ())], pad_id=0)


def _rollout_batch(offset: int) -> SequenceBatch:
    tokens = torch.tensor([[1, 2, 3 + offset, 4], [1, 5 + offset, 0, 0]])
    mask = torch.tensor([[False, False, True, True], [False, True, False, False]])
    return SequenceBatch(tokens, mask, torch.tensor([4, 2]), torch.tensor([2, 1]), "rollout",
                         rollout_logprobs=torch.tensor([[0, 0, -0.5, -1.0], [0, -2.0, 0, 0]]))


def test_replay_buffer_evicts_samples_and_restores():
    buffer = ReplayBuffer(3, seed=0)
    assert buffer.sample(1, 0, step=0) is None
    for offset in range(3):
        buffer.add(_rollout_batch(10 * offset))
    assert len(buffer) == 3  # capacity: the oldest three of six rows were evicted
    kept = {tuple(r["tokens"]) for r in buffer.state_dict()["rows"]}
    assert kept == {(1, 15), (1, 2, 23, 4), (1, 25)}
    sample = buffer.sample(2, 0, step=7)
    assert sample.source == "replay" and sample.tokens.shape[0] == 2
    rows = {tuple(sample.tokens[r, :int(sample.lengths[r])].tolist()) for r in range(2)}
    assert len(rows) == 2 and rows <= kept  # distinct stored sequences, re-padded
    long_row = [r for r in range(2) if int(sample.lengths[r]) == 4]
    for r in long_row:
        assert sample.rollout_logprobs[r].tolist() == [0, 0, -0.5, -1.0]
        assert sample.loss_mask[r].tolist() == [False, False, True, True]

    restored = ReplayBuffer(3, seed=0)
    restored.load_state_dict(buffer.state_dict())
    again = restored.sample(2, 0, step=7)
    assert torch.equal(again.tokens, sample.tokens)
    with pytest.raises(ValueError, match="only fresh rollouts"):
        buffer.add(SequenceBatch.from_examples([Example(0, (1,), (2,))], pad_id=0))
    with pytest.raises(ValueError, match="capacity 3, the run asks for 4"):
        ReplayBuffer(4, seed=0).load_state_dict(buffer.state_dict())
