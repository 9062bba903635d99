"""Seed-004 schedules (what each strategy does at each step) and context-distillation alignment."""

from __future__ import annotations

import pytest
import torch

from nemo_opd.config import DistillConfig, StrategyConfig
from nemo_opd.data import lambda_draw
from nemo_opd.strategies import TeacherContext, build_strategy

STEPS = 120


def _plans(name: str, lmbda: float = 1.0, **params) -> list:
    distill = DistillConfig(lmbda=lmbda, strategy=StrategyConfig(name=name, **params))
    strategy = build_strategy(distill, seed=11)
    return [strategy.plan(step) for step in range(STEPS)]


def _sources(plans) -> list[tuple[str, ...]]:
    return [p.sources for p in plans]


def test_on_policy_gkd_follows_lambda_draws():
    for lmbda in (0.0, 1.0):
        assert set(_sources(_plans("on_policy_gkd", lmbda))) == {
            ("rollout",) if lmbda else ("dataset",)}
    plans = _plans("on_policy_gkd", 0.3)
    draws = [lambda_draw(0.3, seed=11, step=s) for s in range(STEPS)]
    assert [p.sources == ("rollout",) for p in plans] == draws
    assert 0.15 < sum(draws) / STEPS < 0.45  # binomial(120, 0.3): 4 sigma ≈ ±0.17
    assert all(p.anchor_weight == 0 and p.parts[0].prefix_tokens == 0 for p in plans)


def test_extended_on_policy_is_on_policy_for_more_steps():
    from nemo_opd.config import DataConfig, ModelConfig, OptimConfig, RunConfig

    assert _sources(_plans("extended_on_policy")) == [("rollout",)] * STEPS
    common = dict(model=ModelConfig(student="student_dir"),
                  data=DataConfig(train_files=("train.jsonl",)), optim=OptimConfig(steps=100))
    extended = DistillConfig(strategy=StrategyConfig(name="extended_on_policy"))
    assert RunConfig(**common, distill=extended).total_steps == 200
    assert RunConfig(**common).total_steps == 100


def test_hybrid_and_reverse_curriculum_switch_at_k():
    hybrid = _sources(_plans("hybrid", switch_step=50))
    assert hybrid == [("dataset",)] * 50 + [("rollout",)] * (STEPS - 50)
    reverse = _sources(_plans("reverse_curriculum", switch_step=70))
    assert reverse == [("rollout",)] * 70 + [("dataset",)] * (STEPS - 70)
    # The on-policy phase still draws λ per batch.
    mixed = _plans("hybrid", 0.5, switch_step=10)
    assert [p.sources == ("rollout",) for p in mixed[10:]] == [
        lambda_draw(0.5, seed=11, step=s) for s in range(10, STEPS)]


def test_teacher_seeded_prefix_follows_seed_004_schedule():
    from nemo_opd.rollout.teacher_seeded import PrefixSchedule

    plans = _plans("teacher_seeded", seed_tokens=20, seed_decay_steps=50)
    prefix = [p.parts[0].prefix_tokens for p in plans]
    # Seed 004: N starts at 20 and decays linearly to 0 over 50 steps (integer tokens: within
    # one token of the line), then stays 0; it is the rollout package's schedule.
    line = [max(0.0, 20 * (1 - s / 50)) for s in range(STEPS)]
    assert prefix[0] == 20 and prefix[25] == 10 and all(n == 0 for n in prefix[50:])
    assert all(abs(n - x) < 1 for n, x in zip(prefix, line, strict=True))
    assert all(a >= b for a, b in zip(prefix[:-1], prefix[1:], strict=True))
    assert prefix == [PrefixSchedule(start=20, end=0, decay_steps=50)(s) for s in range(STEPS)]
    assert set(_sources(plans)) == {("rollout",)}


def test_mixture_weights_every_step():
    plans = _plans("mixture", mixture_weight=0.3)
    assert all(p.sources == ("dataset", "rollout") for p in plans)
    assert all([part.weight for part in p.parts] == [0.3, 0.7] for p in plans)
    only_on = _plans("mixture", mixture_weight=0.0)
    assert all(p.sources == ("rollout",) and p.parts[0].weight == 1.0 for p in only_on)


def test_replay_buffer_replays_periodically():
    plans = _plans("replay_buffer", replay_every=4)
    assert _sources(plans) == [("replay",) if (s + 1) % 4 == 0 else ("rollout",)
                               for s in range(STEPS)]


def test_kl_anchored_adds_the_anchor():
    plans = _plans("kl_anchored", 0.0, anchor_weight=0.25)
    assert all(p.sources == ("dataset",) and p.anchor_weight == 0.25 for p in plans)
    strategy = build_strategy(DistillConfig(strategy=StrategyConfig(name="kl_anchored")), seed=0)
    assert strategy.needs_anchor
    assert not build_strategy(DistillConfig(), seed=0).needs_anchor


def test_bad_strategy_config_names_field_and_value():
    with pytest.raises(ValueError, match=r"StrategyConfig.name must be one of .*'onpolicy'"):
        StrategyConfig(name="onpolicy")
    with pytest.raises(ValueError, match=r"StrategyConfig.mixture_weight .* got 1.5"):
        StrategyConfig(mixture_weight=1.5)
    with pytest.raises(ValueError, match=r"StrategyConfig.replay_every .* got 1"):
        StrategyConfig(replay_every=1)


def test_context_distillation_aligns_teacher_positions(tiny_model_dirs):
    """Teacher logits aligned to student position t equal an independent HF forward of
    context + tokens[:t+1] (its last position): both predict tokens[t+1]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float64)
    context = TeacherContext((5, 17, 42, 9))
    tokens = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        aligned = context.align(model(context.inputs(tokens)).logits, tokens.shape[1])
        assert aligned.shape[:2] == tokens.shape
        for t in range(tokens.shape[1]):
            prefix = torch.cat([torch.tensor([context.context_ids] * 2), tokens[:, :t + 1]], 1)
            torch.testing.assert_close(aligned[:, t], model(prefix).logits[:, -1],
                                       rtol=1e-10, atol=1e-10)
    assert torch.equal(TeacherContext().inputs(tokens), tokens)
    with pytest.raises(ValueError, match="expected context 4 \\+ sequence 7"):
        context.align(torch.zeros(2, 7, 3), 7)
