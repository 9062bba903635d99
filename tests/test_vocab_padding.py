"""A vocabulary that TP does not divide (385 at TP=2): padded to 386 as megatron-core pads, and
the padded id kept out of logits, log-probs, the divergence, sampling and lm-eval scores — each
against HF's float64 model over the real 385 ids."""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks

from nemo_opd.models.vocab import PADDED_LOGIT
from nemo_opd.runtime import ParallelConfig

VOCAB = 385
SEQ = 16


@pytest.fixture(scope="module")
def odd_vocab_dirs(tmp_path_factory, tiny_tokenizer) -> list[str]:
    """Two tiny Qwen3 models (student, teacher) whose config and weights have 385 rows."""
    from nemo_opd.models.tiny import TinyModelSpec, make_tiny_hf_model

    spec = TinyModelSpec(vocab_multiple=VOCAB)
    root = tmp_path_factory.mktemp("odd_vocab")
    return [str(make_tiny_hf_model(root / name, "qwen3", spec, seed=seed,
                                   tokenizer=tiny_tokenizer))
            for seed, name in ((11, "student"), (12, "teacher"))]


def _hf_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)(ids).logits


def _reference_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float,
                   temperature: float) -> float:
    """The project's β convention in float64: forward KL at 0, reverse KL at 1, else the JSD
    with mixture ``M = β T + (1 - β) S``; mean over tokens."""
    s = torch.log_softmax(student / temperature, -1)
    t = torch.log_softmax(teacher / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1).mean().item()
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1).mean().item()
    m = torch.logaddexp(t + torch.log(torch.tensor(beta)), s + torch.log(torch.tensor(1 - beta)))
    per_token = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return per_token.mean().item()


def _padded_vocab_job(model_dirs: list[str]) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from transformers import AutoTokenizer

    from nemo_opd.eval import MegatronLM
    from nemo_opd.loss import generalized_jsd, vocab_parallel_logprobs
    from nemo_opd.models.hf_import import load_hf_gpt
    from nemo_opd.rollout import MegatronEngine, SamplingParams
    from nemo_opd.runtime import distributed_runtime

    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand_as(ids)
    out = {}
    with distributed_runtime(ParallelConfig(2)):
        tp = parallel_state.get_tensor_model_parallel_group()
        student, teacher = (load_hf_gpt(d, ParallelConfig(2)).eval() for d in model_dirs)
        out["rows"] = student.vocab_size
        with torch.no_grad():
            logits = [m(ids, positions, attention_mask=None) for m in (student, teacher)]
        full = gather_from_tensor_model_parallel_region(logits[0], group=tp)
        out["real_logits"] = full[..., :VOCAB].double()
        out["padded_logits"] = full[..., VOCAB:]
        out["logprobs"] = vocab_parallel_logprobs(logits[0][:, :-1], ids[:, 1:], tp_group=tp)
        out["jsd"] = {(beta, temp): generalized_jsd(logits[0], logits[1], beta=beta,
                                                    temperature=temp, tp_group=tp).item()
                      for beta in (0.0, 0.5, 1.0) for temp in (1.0, 0.5)}
        engine = MegatronEngine(student, pad_id=0, eos_id=None)
        rollout = engine.generate([[5, 6, 7], [8]], SamplingParams(
            temperature=3.0, max_new_tokens=48, n=4, seed=1, logprobs="raw"))
        out["sampled_max_id"] = int(rollout.tokens.max())
        out["rollout_logprobs_finite"] = bool(torch.isfinite(rollout.logprobs).all())
        tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
        from lm_eval.api.instance import Instance

        request = Instance("loglikelihood", {}, ("question: what is", " 12 plus 30"), 0)
        out["loglikelihood"] = MegatronLM(student, tokenizer).loglikelihood([request])[0][0]
    return out


@pytest.mark.multirank
def test_padded_vocab_is_invisible_at_tp2(odd_vocab_dirs):
    from transformers import AutoTokenizer

    from nemo_opd.models.hf_config import read_hf_config

    assert read_hf_config(odd_vocab_dirs[0]).vocab_size == VOCAB
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    hf_student, hf_teacher = (_hf_logits(d, ids) for d in odd_vocab_dirs)
    hf_logprobs = torch.log_softmax(hf_student, -1)
    tok = AutoTokenizer.from_pretrained(odd_vocab_dirs[0])
    whole = tok.encode("question: what is 12 plus 30")
    n_ctx = len(tok.encode("question: what is"))
    hf_loglik = sum(float(torch.log_softmax(_hf_logits(odd_vocab_dirs[0], torch.tensor([whole]))
                                            [0], -1)[i - 1, whole[i]])
                    for i in range(n_ctx, len(whole)))

    for out in run_ranks(_padded_vocab_job, world_size=2, model_dirs=odd_vocab_dirs):
        assert out["rows"] == VOCAB + 1
        real = out["real_logits"]
        assert ((real - hf_student).abs().max() / hf_student.abs().max()) < 1e-5
        assert torch.all(out["padded_logits"] == PADDED_LOGIT)
        expected = hf_logprobs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        assert torch.allclose(out["logprobs"].double(), expected, atol=1e-5)
        for (beta, temp), value in out["jsd"].items():
            reference = _reference_jsd(hf_student, hf_teacher, beta, temp)
            assert value == pytest.approx(reference, rel=1e-4, abs=1e-7), (beta, temp)
        assert out["sampled_max_id"] < VOCAB and out["rollout_logprobs_finite"]
        assert out["loglikelihood"] == pytest.approx(hf_loglik, abs=1e-4)


def _export_padded_student(model_dir: str, out_dir: str) -> None:
    """A TP=2-trained student's shell (386 rows) restored whole at TP=1, quantized, exported."""
    from nemo_opd.models.hf_config import read_hf_config
    from nemo_opd.models.hf_import import build_gpt_model
    from nemo_opd.models.vocab import PaddedVocabImporter
    from nemo_opd.quant.export import export_student
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.runtime import distributed_runtime

    config = read_hf_config(model_dir)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with distributed_runtime():
        model = build_gpt_model(config, vocab_rows=config.padded_vocab_size(2))
        PaddedVocabImporter(model, model_dir, dtype=torch.float32).import_weights()
        quantize_student(model, "fp8", lambda m: m(ids, torch.arange(SEQ).expand_as(ids),
                                                   attention_mask=None))
        export_student(model, model_dir, out_dir, dtype=torch.float32)


@pytest.mark.multirank
def test_export_of_a_padded_student_has_the_hf_vocabulary(odd_vocab_dirs, tmp_path):
    from safetensors.torch import load_file

    run_ranks(_export_padded_student, world_size=1, model_dir=odd_vocab_dirs[0],
              out_dir=str(tmp_path / "export"))
    exported = {k: v for f in (tmp_path / "export").glob("*.safetensors")
                for k, v in load_file(f).items()}
    source = load_file(f"{odd_vocab_dirs[0]}/model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert exported[key].shape == (VOCAB, 64), key
        assert torch.equal(exported[key], source[key]), key
