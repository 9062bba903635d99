"""Rollout engines: sampling math vs float64 / HF references, the megatron engine at TP=1 and TP=2
(teacher-forced log-probs, KV cache vs recomputation, HF ``generate`` peer check, stop / length /
n / forced-prefix semantics, bad input), a quantized student, and teacher-seeded rollouts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from multirank import run_ranks

from nemo_opd.rollout import (
    PrefixSchedule,
    RolloutBatch,
    SamplingParams,
    TeacherSeededRollouts,
    filter_logits,
    sample_tokens,
)

TEXTS = ("question: what is 12 plus 30? answer:", "the cat", "red fish and blue bird runs")
MAX_NEW = 12
TOL = 1e-5


# ----------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("field, value, fragment", [
    ("n", 0, "SamplingParams.n must be an int >= 1"),
    ("temperature", -0.1, "SamplingParams.temperature"),
    ("temperature", float("inf"), "SamplingParams.temperature"),
    ("top_p", 0.0, "SamplingParams.top_p must be a number in (0, 1]"),
    ("top_p", 1.5, "SamplingParams.top_p"),
    ("top_k", -1, "SamplingParams.top_k"),
    ("max_new_tokens", 0, "SamplingParams.max_new_tokens must be an int >= 1"),
    ("min_new_tokens", 65, "SamplingParams.min_new_tokens must be an int in [0, "
                           "max_new_tokens=64]"),
    ("stop_token_ids", [2], "SamplingParams.stop_token_ids must be a tuple"),
    ("stop_token_ids", (-1,), "SamplingParams.stop_token_ids"),
    ("seed", 1.5, "SamplingParams.seed"),
    ("logprobs", "processed", "SamplingParams.logprobs"),
])
def test_sampling_params_reject_bad_values(field, value, fragment):
    with pytest.raises(ValueError, match=f"^{_escape(fragment)}.*got {_escape(repr(value))}$"):
        SamplingParams(**{field: value})


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_rollout_batch_rejects_mismatched_shapes():
    ok = dict(tokens=torch.zeros(2, 5, dtype=torch.long), prompt_lengths=torch.ones(2),
              prefix_lengths=torch.zeros(2), lengths=torch.full((2,), 5),
              logprobs=torch.zeros(2, 5), loss_mask=torch.zeros(2, 5, dtype=torch.bool),
              logprob_kind="sampling", stopped=torch.zeros(2, dtype=torch.bool), pad_id=0,
              generation_seconds=0.5)
    batch = RolloutBatch(**ok)
    assert batch.num_generated_tokens == 8 and batch.tokens_per_second == 16
    with pytest.raises(ValueError, match=r"RolloutBatch.logprobs must have shape \(2, 5\)"):
        RolloutBatch(**{**ok, "logprobs": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match=r"RolloutBatch.lengths must have shape \(2,\)"):
        RolloutBatch(**{**ok, "lengths": torch.zeros(3)})
    with pytest.raises(ValueError, match="RolloutBatch.samples_per_prompt must be an int >= 1 "
                                         "dividing the 2 rows, got 3"):
        RolloutBatch(**ok, samples_per_prompt=3)
    with pytest.raises(ValueError, match="RolloutBatch.logprob_kind"):
        RolloutBatch(**{**ok, "logprob_kind": "greedy"})


def test_prefix_schedule_is_rounded_linear_decay():
    from fractions import Fraction

    for schedule in (PrefixSchedule(), PrefixSchedule(7, 3, 9), PrefixSchedule(0, 10, 4)):
        for step in range(0, 70):
            frac = min(step, schedule.decay_steps) / Fraction(schedule.decay_steps)
            exact = schedule.start + (schedule.end - schedule.start) * frac
            assert schedule(step) == int(exact + Fraction(1, 2) - (exact + Fraction(1, 2)) % 1)
    assert [PrefixSchedule()(s) for s in (0, 25, 49, 50, 1000)] == [20, 10, 0, 0, 0]
    assert PrefixSchedule(5, 2, 0)(0) == 2
    with pytest.raises(ValueError, match="PrefixSchedule.decay_steps must be an int >= 0"):
        PrefixSchedule(decay_steps=-1)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        PrefixSchedule()(-1)
    with pytest.raises(ValueError, match="loss_tokens must be one of"):
        TeacherSeededRollouts(None, None, loss_tokens="prefix")
    seeded = TeacherSeededRollouts(None, None, PrefixSchedule(20, 0, 50))
    assert seeded.prefix_length(0, SamplingParams(max_new_tokens=8)) == 7  # student writes >= 1
    assert seeded.prefix_length(0, SamplingParams(max_new_tokens=64)) == 20


def _kept_reference(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """float64, row by row, from the definitions: top-k with ties, then the smallest most-likely
    set whose probability reaches top_p."""
    kept = torch.zeros(logits.shape, dtype=torch.bool)
    for r, row in enumerate(logits.double()):
        keep = torch.ones_like(row, dtype=torch.bool)
        if top_k:
            keep &= row >= torch.sort(row, descending=True).values[top_k - 1]
        probs = torch.where(keep, row, torch.tensor(float("-inf"), dtype=row.dtype)).softmax(-1)
        order = torch.argsort(probs, descending=True, stable=True)
        total = 0.0
        nucleus = torch.zeros_like(keep)
        for idx in order.tolist():
            nucleus[idx] = True
            total += probs[idx].item()
            if total >= top_p - 1e-12:
                break
        kept[r] = keep & nucleus
    return kept


def test_filter_logits_matches_definitions_and_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=gen, dtype=torch.float64) * 2
    tied = logits.clone()
    tied[0, :4] = tied[0].max() + 1  # a 4-way tie: top-k keeps all of it
    # (top-p splits ties by sort order, as HF does, so its cases use tie-free logits)
    for top_k, top_p, case in ((0, 0.9, logits), (5, 1.0, tied), (3, 0.5, logits),
                               (10, 0.3, logits), (1, 1.0, tied), (0, 0.01, logits)):
        ours = filter_logits(case, top_k=top_k, top_p=top_p)
        kept = torch.isfinite(ours)
        assert torch.equal(kept, _kept_reference(case, top_k, top_p)), (top_k, top_p)
        assert torch.equal(ours[kept], case[kept])
        hf = case
        if top_k:
            hf = TopKLogitsWarper(top_k)(None, hf)
        if top_p < 1:
            hf = TopPLogitsWarper(top_p)(None, hf)
        assert torch.equal(torch.isfinite(hf), kept), (top_k, top_p)


def test_sample_tokens_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40000, 1)
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, seed=0)
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[:, 1] = True
    drawn = sample_tokens(logits, params, banned=banned,
                          generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(filter_logits(
        logits[:1].masked_fill(banned[:1], float("-inf")) / 0.7, top_k=4, top_p=0.9), -1)[0]
    freq = torch.bincount(drawn.tokens, minlength=6).double() / len(drawn.tokens)
    torch.testing.assert_close(freq, expected.exp().double(), atol=0.01, rtol=0)
    assert drawn.kind == "sampling" and freq[1] == 0
    torch.testing.assert_close(drawn.logprobs, expected[drawn.tokens])
    raw = sample_tokens(logits[:3], dataclasses.replace(params, logprobs="raw"),
                        generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(raw.logprobs, torch.log_softmax(logits[:3], -1)
                               .gather(-1, raw.tokens[:, None]).squeeze(-1))
    greedy = sample_tokens(logits[:2], SamplingParams(temperature=0), banned=banned[:2])
    assert greedy.tokens.tolist() == [0, 0] and greedy.kind == "raw"


# ----------------------------------------------------------------------------- engine, TP=1/TP=2


def _teacher_forced(model, batch: RolloutBatch, params: SamplingParams,
                    stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """``[R, T]`` log-probs of ``batch.tokens`` from one full forward without a KV cache (right
    padding cannot reach earlier positions through the causal mask): ``stop_ids`` banned before
    ``min_new_tokens``, then HF's temperature / top-k / top-p warpers, then log_softmax
    (greedy and ``logprobs="raw"``: log_softmax of the logits alone)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = batch.tokens
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, None, runtime_gather_output=True).float()
    if not params.greedy and params.logprobs == "sampling" and params.min_new_tokens:
        written_before = (torch.arange(ids.shape[1] - 1)[None, :] + 1
                          - batch.prompt_lengths[:, None] - batch.prefix_lengths[:, None])
        early = (written_before >= 0) & (written_before < params.min_new_tokens)
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool)
        banned[list(stop_ids)] = True
        logits[:, :-1] = logits[:, :-1].masked_fill(early[:, :, None] & banned, float("-inf"))
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    if not params.greedy and params.logprobs == "sampling":
        flat = TemperatureLogitsWarper(params.temperature)(None, flat)
        if params.top_k:
            flat = TopKLogitsWarper(params.top_k)(None, flat)
        if params.top_p < 1:
            flat = TopPLogitsWarper(params.top_p)(None, flat)
    logprobs = torch.log_softmax(flat, -1).gather(-1, ids[:, 1:].reshape(-1, 1))
    out = torch.zeros_like(batch.logprobs)
    out[:, 1:] = logprobs.reshape(ids.shape[0], -1)
    return out


def _check_batch_layout(batch: RolloutBatch, prompts, prefixes, params: SamplingParams,
                        stop_ids) -> None:
    rows = len(prompts) * params.n
    assert batch.tokens.shape[0] == rows and batch.samples_per_prompt == params.n
    for r in range(rows):
        prompt, prefix = prompts[r // params.n], prefixes[r // params.n]
        start, end = len(prompt) + len(prefix), int(batch.lengths[r])
        assert batch.tokens[r, :len(prompt)].tolist() == prompt
        assert batch.tokens[r, len(prompt):start].tolist() == prefix
        assert (batch.prompt_lengths[r], batch.prefix_lengths[r]) == (len(prompt), len(prefix))
        written = batch.tokens[r, start:end].tolist()
        assert (batch.tokens[r, end:] == batch.pad_id).all()
        assert batch.loss_mask[r].nonzero().squeeze(1).tolist() == list(range(start, end))
        assert (batch.logprobs[r, :start] == 0).all() and (batch.logprobs[r, end:] == 0).all()
        assert (batch.logprobs[r, start:end] <= 0).all()
        hit = [i for i, t in enumerate(written) if t in stop_ids]
        if prefix and prefix[-1] in stop_ids:
            assert written == [] and bool(batch.stopped[r])
            continue
        assert params.min_new_tokens <= len(written) <= params.max_new_tokens
        assert not [i for i in hit if i < params.min_new_tokens]
        if batch.stopped[r]:
            assert hit == [len(written) - 1]
        else:
            assert hit == [] and len(written) == params.max_new_tokens


def _engine_checks(model_dirs: dict[str, str], quant_dir: str, eos_id: int, pad_id: int,
                   prompts: list[list[int]], stop_id: int) -> dict:
    """On each of 2 ranks: the llama at TP=2 (global layout) and TP=1 (own groups), the qwen3
    teacher at TP=1, the int4 student at TP=2."""
    from megatron.core import parallel_state

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.rollout import MegatronEngine
    from nemo_opd.runtime import ParallelConfig, distributed_runtime, model_process_groups

    out: dict = {"tokens": {}, "lp_err": {}}
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2)):
        rank = parallel_state.get_tensor_model_parallel_rank()
        tp1_groups = model_process_groups(ParallelConfig(1))
        models = {2: load_hf_gpt(model_dirs["llama"], ParallelConfig(2)),
                  1: load_hf_gpt(model_dirs["llama"], ParallelConfig(1), pg_collection=tp1_groups)}
        free = [t for t in range(10, 20) if t not in (stop_id, eos_id)]
        # Row 1's prefix ends with EOS: that row is complete before the engine writes anything.
        prefixes = [[], [free[0], free[1], eos_id], [free[2], free[3]]]
        cases = {
            "greedy": (SamplingParams(temperature=0, max_new_tokens=MAX_NEW), None),
            "greedy_stop_min": (SamplingParams(temperature=0, max_new_tokens=MAX_NEW,
                                               min_new_tokens=5, stop_token_ids=(stop_id,)), None),
            "sampled": (SamplingParams(temperature=0.8, n=3, max_new_tokens=MAX_NEW, seed=11),
                        prefixes),
            "filtered": (SamplingParams(temperature=1.3, top_k=40, top_p=0.8, n=2,
                                        max_new_tokens=MAX_NEW, seed=5, min_new_tokens=2,
                                        stop_token_ids=(stop_id,)), None),
            "raw": (SamplingParams(temperature=0.9, max_new_tokens=MAX_NEW, seed=3,
                                   logprobs="raw"), prefixes),
        }
        for tp, model in models.items():
            engine = MegatronEngine(model, pad_id=pad_id, eos_id=eos_id)
            no_cache = MegatronEngine(model, pad_id=pad_id, eos_id=eos_id, use_kv_cache=False)
            model.train()
            for name, (params, forced) in cases.items():
                batch = engine.generate(prompts, params, forced_prefixes=forced)
                stop_ids = {eos_id, *params.stop_token_ids}
                _check_batch_layout(batch, prompts, forced or [[]] * len(prompts), params,
                                    stop_ids)
                assert all(m.training for m in model.modules())  # mode restored
                assert all(p.grad is None for p in model.parameters())
                assert batch.logprob_kind == ("raw" if name.startswith("greedy") or name == "raw"
                                              else "sampling")
                reference = _teacher_forced(model, batch, params, tuple(stop_ids))
                out["lp_err"][(tp, name)] = (
                    (batch.logprobs - reference)[batch.loss_mask].abs().max().item())
                recomputed = no_cache.generate(prompts, params, forced_prefixes=forced)
                assert torch.equal(recomputed.tokens, batch.tokens), (tp, name)
                out["lp_err"][(tp, name, "no_cache")] = (
                    (recomputed.logprobs - batch.logprobs).abs().max().item())
                out["tokens"][(tp, name)] = batch.tokens
            # n > 1 rows differ; the same seed repeats; seed=None still agrees across TP ranks.
            sampled = out["tokens"][(tp, "sampled")]
            assert len({tuple(row.tolist()) for row in sampled[:3]}) > 1
            again = engine.generate(prompts, cases["sampled"][0], forced_prefixes=prefixes)
            assert torch.equal(again.tokens, sampled)
            unseeded = SamplingParams(max_new_tokens=MAX_NEW)
            out["tokens"][(tp, "unseeded")] = engine.generate(prompts, unseeded).tokens
            # A forced prefix continues exactly like a prompt that already holds it.
            greedy = cases["greedy"][0]
            seeded = engine.generate(prompts, greedy, forced_prefixes=prefixes)
            joined = engine.generate([p + q for p, q in zip(prompts, prefixes, strict=True)],
                                     greedy)
            keep = ~torch.tensor([bool(q) and q[-1] == eos_id for q in prefixes])
            assert torch.equal(seeded.tokens[keep], joined.tokens[keep])
            torch.testing.assert_close(seeded.logprobs[keep][seeded.loss_mask[keep]],
                                       joined.logprobs[keep][joined.loss_mask[keep]],
                                       atol=TOL, rtol=0)
            # The model's context limit ends rows without error (not a stop).
            short = MegatronEngine(model, pad_id=pad_id, eos_id=eos_id,
                                   max_sequence_length=max(map(len, prompts)) + 2)
            capped = short.generate(prompts, greedy)
            assert capped.lengths.tolist() == [short.max_sequence_length] * len(prompts)
            assert not capped.stopped.any()
        out["errors"] = _error_messages(models[2], prompts, pad_id, eos_id, rank)
        out["lp_err"][(2, "live_weights")] = _live_weights_error(models[2], prompts, pad_id,
                                                                 eos_id)

        # Teacher-seeded: the TP=2 llama continues what a TP=1 qwen3 teacher wrote.
        teacher = MegatronEngine(
            load_hf_gpt(model_dirs["qwen3"], ParallelConfig(1), pg_collection=tp1_groups),
            pad_id=pad_id, eos_id=eos_id)
        student = MegatronEngine(models[2], pad_id=pad_id, eos_id=eos_id)
        out["seeded"] = _teacher_seeded_checks(student, teacher, prompts)

        # A quantized student (ModelOpt INT4 fake quant) generates at TP=2, log-probs exact.
        quant_model = load_hf_gpt(quant_dir, ParallelConfig(2))
        quant_prompts = prompts
        params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
        before = MegatronEngine(quant_model, pad_id=pad_id, eos_id=eos_id).generate(
            quant_prompts, params)
        quantize_student(quant_model, "int4")
        quant_engine = MegatronEngine(quant_model, pad_id=pad_id, eos_id=eos_id)
        quant = quant_engine.generate(quant_prompts, params)
        out["lp_err"][(2, "int4")] = (quant.logprobs - _teacher_forced(quant_model, quant, params)
                                      )[quant.loss_mask].abs().max().item()
        out["int4_logprobs_moved"] = (quant.logprobs - before.logprobs).abs().max().item()
        out["tokens"][(2, "int4")] = quant.tokens
    return out


def _live_weights_error(model, prompts, pad_id: int, eos_id: int) -> float:
    """Colocated: an in-place weight update (an optimizer step) shows in the next rollout with
    update_weights a no-op; returns the teacher-forced log-prob error under the new weights."""
    from nemo_opd.rollout import MegatronEngine

    engine = MegatronEngine(model, pad_id=pad_id, eos_id=eos_id)
    params = SamplingParams(temperature=0.7, max_new_tokens=MAX_NEW, seed=2)
    before = engine.generate(prompts, params)
    original = model.output_layer.weight.detach().clone()
    with torch.no_grad():
        model.output_layer.weight.mul_(3.0)
    try:
        engine.update_weights(model)
        after = engine.generate(prompts, params)
        assert not torch.equal(after.logprobs, before.logprobs)
        return (after.logprobs - _teacher_forced(model, after, params))[after.loss_mask].abs().max(
        ).item()
    finally:
        with torch.no_grad():
            model.output_layer.weight.copy_(original)


def _error_messages(model, prompts, pad_id: int, eos_id: int, rank: int) -> dict[str, str]:
    from nemo_opd.rollout import MegatronEngine

    engine = MegatronEngine(model, pad_id=pad_id, eos_id=eos_id)
    params = SamplingParams(max_new_tokens=4)
    calls = {
        "no_prompts": lambda: engine.generate([], params),
        "empty_prompt": lambda: engine.generate([prompts[0], []], params),
        "out_of_vocab": lambda: engine.generate([[1, engine.vocab_size]], params),
        "too_long": lambda: engine.generate([[1] * 200, [2] * 256], params),
        "prefix_count": lambda: engine.generate(prompts, params, forced_prefixes=[[1]]),
        "tp_mismatch": lambda: engine.generate([[1 + rank]], params),
        "bad_pad": lambda: MegatronEngine(model, pad_id=-1, eos_id=eos_id),
    }
    messages = {}
    for name, call in calls.items():
        with pytest.raises(ValueError) as error:
            call()
        messages[name] = str(error.value)
    return messages


def _teacher_seeded_checks(student, teacher, prompts) -> dict:
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    n_prefix = 5
    rollouts = TeacherSeededRollouts(student, teacher, PrefixSchedule(n_prefix, 0, 10))
    batch = rollouts.generate(prompts, params, step=0)
    teacher_alone = teacher.generate(prompts, dataclasses.replace(params, max_new_tokens=n_prefix))
    prefixes = [teacher_alone.tokens[r, len(p):int(teacher_alone.lengths[r])].tolist()
                for r, p in enumerate(prompts)]
    student_alone = student.generate(prompts, dataclasses.replace(
        params, max_new_tokens=MAX_NEW - n_prefix), forced_prefixes=prefixes)
    assert batch.prefix_lengths.tolist() == [n_prefix] * len(prompts)
    assert batch.samples_per_prompt == 1
    assert torch.equal(batch.tokens, student_alone.tokens)
    assert torch.equal(batch.loss_mask, batch.generated_mask())
    assert int(batch.response_lengths.max()) <= MAX_NEW - n_prefix
    width = teacher_alone.logprobs.shape[1]
    expected = torch.where(batch.prefix_mask()[:, :width], teacher_alone.logprobs,
                           student_alone.logprobs[:, :width])
    torch.testing.assert_close(batch.logprobs[:, :width], expected, atol=0, rtol=0)
    assert (batch.logprobs[batch.prefix_mask()] < 0).all()
    results = {"tokens": batch.tokens, "teacher_tokens": teacher_alone.tokens}
    for tokens in ("teacher", "all"):
        other = TeacherSeededRollouts(student, teacher, PrefixSchedule(n_prefix, 0, 10),
                                      loss_tokens=tokens).generate(prompts, params, step=0)
        wanted = batch.prefix_mask() | (batch.generated_mask() if tokens == "all" else False)
        assert torch.equal(other.loss_mask, wanted), tokens
    capped = TeacherSeededRollouts(student, teacher, PrefixSchedule(20, 0, 50)).generate(
        prompts, params, step=0)
    assert capped.prefix_lengths.tolist() == [MAX_NEW - 1] * len(prompts)
    assert (capped.response_lengths == 1).all()
    done = TeacherSeededRollouts(student, teacher).generate(prompts, params, step=50)
    assert (done.prefix_lengths == 0).all()
    assert torch.equal(done.tokens, student.generate(prompts, params).tokens)
    return results


def _hf_greedy(model_dir: str, prompts, eos_ids, min_new: int) -> list[list[int]]:
    """HF ``generate(do_sample=False)`` continuation of each prompt, up to its stop id."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW,
                             min_new_tokens=min_new, eos_token_id=list(eos_ids),
                             pad_token_id=eos_ids[0], attention_mask=torch.ones(1, len(prompt),
                                                                                dtype=torch.long))
        new = ids[0, len(prompt):].tolist()
        for i, token in enumerate(new):
            if token in eos_ids:
                new = new[:i + 1]
                break
        out.append(new)
    return out


def _continuations(tokens: torch.Tensor, prompts, pad_id: int) -> list[list[int]]:
    return [[t for t in row[len(p):].tolist() if t != pad_id] for row, p in zip(tokens, prompts,
                                                                               strict=True)]


@pytest.mark.multirank
def test_megatron_engine_tp1_tp2_against_teacher_forcing_hf_and_each_other(
        tiny_model_dirs, tiny_quant_model_dir, tiny_tokenizer):
    eos_id, pad_id = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) == 3  # unequal prompt lengths
    plain = _hf_greedy(tiny_model_dirs["llama"], prompts, [eos_id], 0)
    stop_id = plain[0][2]  # a token greedy decoding really writes
    results = run_ranks(_engine_checks, world_size=2, model_dirs=tiny_model_dirs,
                        quant_dir=tiny_quant_model_dir, eos_id=eos_id, pad_id=pad_id,
                        prompts=prompts, stop_id=stop_id)
    first, second = results
    for key, tokens in first["tokens"].items():  # TP ranks agree exactly, seed=None included
        assert torch.equal(tokens, second["tokens"][key]), key
    for name in ("greedy", "greedy_stop_min", "sampled", "filtered", "raw"):  # TP=1 == TP=2
        assert torch.equal(first["tokens"][(1, name)], first["tokens"][(2, name)]), name
    for key, err in first["lp_err"].items():
        assert err < TOL, (key, err)
    assert first["int4_logprobs_moved"] > 1e-3  # the quantizers are live during generation
    # Peer check: HF generate(do_sample=False), also with a stop id and min_new_tokens.
    stopped = _hf_greedy(tiny_model_dirs["llama"], prompts, [eos_id, stop_id], 5)
    for tp in (1, 2):
        assert _continuations(first["tokens"][(tp, "greedy")], prompts, pad_id) == plain
        assert _continuations(first["tokens"][(tp, "greedy_stop_min")], prompts,
                              pad_id) == stopped
    # Without min_new_tokens row 0 would end at its third token; with it, it may not.
    assert len(stopped[0]) >= 5 and stopped[0][:3] != plain[0][:3]
    # The qwen3 teacher (qk-layernorm) agrees with HF too: its 5-token greedy prefixes.
    teacher_hf = _hf_greedy(tiny_model_dirs["qwen3"], prompts, [eos_id], 0)
    assert _continuations(first["seeded"]["teacher_tokens"], prompts, pad_id) == [
        t[:5] for t in teacher_hf]
    errors = first["errors"]
    assert "non-empty list of prompts" in errors["no_prompts"]
    assert "prompt 1 is empty" in errors["empty_prompt"]
    assert "prompt 0 holds ids outside the vocabulary [0, 384)" in errors["out_of_vocab"]
    assert ("prompt 1 has 256 tokens" in errors["too_long"]
            and "allows 256 positions" in errors["too_long"]
            and "policy: prompts are never truncated" in errors["too_long"])
    assert "forced_prefixes has 1 entries for 3 prompts" in errors["prefix_count"]
    assert "every TP rank must ask for the same rollouts" in errors["tp_mismatch"]
    assert "pad_id must be an id in [0, 384)" in errors["bad_pad"]
    assert second["errors"]["tp_mismatch"] == errors["tp_mismatch"]
