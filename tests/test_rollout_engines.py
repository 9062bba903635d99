"""External rollout engines: the Hugging Face engine against the megatron engine (tokens and
log-probs on the same weights, refit after a weight change, TP=2 gather), the bad-input checks
(vocabulary, tokenizer, EOS, refit shapes, missing log-probs), the TensorRT-LLM and vLLM engines
against fakes of their libraries (sampling-parameter mapping, log-prob extraction, refit payload,
sleep/wake sequence), and an end-to-end run with the HF engine in bf16 next to an fp32 trainer."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from multirank import run_ranks

from nemo_opd.rollout import SamplingParams
from nemo_opd.rollout.external import (
    Completion,
    EngineUnavailable,
    assemble_batch,
    plan_requests,
    request_seed,
    sampled_logprobs,
)
from nemo_opd.rollout.hf_engine import check_hf_tensors
from nemo_opd.rollout.trtllm_engine import ipc_payload, trtllm_sampling_kwargs
from nemo_opd.rollout.vllm_engine import vllm_sampling_kwargs

TEXTS = ("question: what is 12 plus 30? answer:", "the cat", "red fish and blue bird runs")
MAX_NEW = 10
STOP = 7  # a stop id the fakes write


# ----------------------------------------------------------------------------- pure pieces


def test_sampling_kwargs_map_our_params_onto_the_libraries():
    greedy = SamplingParams(temperature=0, max_new_tokens=9, top_k=5)
    filtered = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, n=3, min_new_tokens=2,
                              stop_token_ids=(5,), logprobs="raw")
    plain = SamplingParams(temperature=1.0)
    # TensorRT-LLM: end_id=-1, not ignore_eos (which would drop stop_token_ids); no min_tokens
    # (its min-length penalty masks only end_id).
    trt = trtllm_sampling_kwargs(dataclasses.replace(filtered, min_new_tokens=0), stop_ids=[2, 5],
                                 max_tokens=6, seed=11, logprob_kind="sampling", pad_id=3)
    assert trt == dict(n=3, max_tokens=6, seed=11, stop_token_ids=[2, 5], end_id=-1,
                       include_stop_str_in_output=True, pad_id=3, detokenize=False, logprobs=0,
                       logprobs_mode="processed", temperature=0.7, top_k=40, top_p=0.9)
    with pytest.raises(NotImplementedError, match="cannot honour min_new_tokens"):
        trtllm_sampling_kwargs(filtered, stop_ids=[2, 5], max_tokens=6, seed=11,
                               logprob_kind="sampling", pad_id=3)
    trt_greedy = trtllm_sampling_kwargs(greedy, stop_ids=[2], max_tokens=9, seed=1,
                                        logprob_kind="sampling", pad_id=3)
    assert trt_greedy["temperature"] == 0.0 and trt_greedy["logprobs_mode"] == "raw"
    assert "top_k" not in trt_greedy and "min_tokens" not in trt_greedy
    trt_plain = trtllm_sampling_kwargs(plain, stop_ids=[2], max_tokens=4, seed=1,
                                       logprob_kind="raw", pad_id=3)
    assert "top_k" not in trt_plain and "top_p" not in trt_plain
    vl = vllm_sampling_kwargs(filtered, stop_ids=[2, 5], max_tokens=6, seed=11)
    assert vl == dict(n=3, max_tokens=6, min_tokens=2, seed=11, stop_token_ids=[2, 5],
                      ignore_eos=True, logprobs=0, detokenize=False, temperature=0.7, top_k=40,
                      top_p=0.9)
    vl_greedy = vllm_sampling_kwargs(greedy, stop_ids=[2], max_tokens=9, seed=1)
    assert vl_greedy["temperature"] == 0.0 and "top_k" not in vl_greedy


def test_sampled_logprobs_reads_every_library_format():
    logprob = SimpleNamespace  # a library's Logprob(logprob=..., rank=...)
    entries = [{4: logprob(logprob=-0.5, rank=1)}, {9: -1.25, 3: -0.1}, logprob(logprob=-2.0),
               -3.0]
    assert sampled_logprobs([4, 9, 8, 1], entries, engine="x") == [-0.5, -1.25, -2.0, -3.0]
    with pytest.raises(RuntimeError, match="x: the log-probs of new token 0 do not hold the "
                                           "sampled token 5"):
        sampled_logprobs([5], [{4: -0.5}], engine="x")
    with pytest.raises(RuntimeError, match="returned 0 log-prob entries for 2 tokens; the "
                                           r"request must ask for the sampled token's log-prob "
                                           r"\(logprobs=0\)"):
        sampled_logprobs([5, 6], None, engine="x")


def test_assemble_batch_row_order_masks_and_stripped_stop_tokens():
    params = SamplingParams(n=2, max_new_tokens=4)
    prompts, prefixes = [[1, 2, 3], [4], [5, 6]], [[], [8, STOP], [9]]
    requests = plan_requests(prompts, prefixes, params, stop_ids=[STOP],
                             max_sequence_length=6, seed=3)
    # Prompt 1's prefix ends with a stop id: no request; prompt 2 has room for 3 new tokens.
    assert [(r.index, r.context, r.max_tokens) for r in requests] == [(0, [1, 2, 3], 3),
                                                                       (2, [5, 6, 9], 3)]
    assert requests[0].seed == request_seed(3, 0) != requests[1].seed == request_seed(3, 2)
    completions = {
        0: [Completion([11, STOP], [-0.1, -0.2], True), Completion([12, 13, 14], [-1, -2, -3],
                                                                   False)],
        2: [Completion([15], [-0.5], True),  # the library dropped the stop token
            Completion([16, STOP, 17], [-0.3, -0.4, -0.6], True)],  # text after a stop: cut
    }
    batch = assemble_batch(prompts, prefixes, completions, params, stop_ids=[STOP], pad_id=0,
                           kind="raw", generation_seconds=0.5)
    assert batch.tokens.tolist() == [[1, 2, 3, 11, STOP, 0], [1, 2, 3, 12, 13, 14],
                                     [4, 8, STOP, 0, 0, 0], [4, 8, STOP, 0, 0, 0],
                                     [5, 6, 9, 15, STOP, 0], [5, 6, 9, 16, STOP, 0]]
    assert batch.lengths.tolist() == [5, 6, 3, 3, 5, 5]
    assert batch.prefix_lengths.tolist() == [0, 0, 2, 2, 1, 1]
    assert batch.stopped.tolist() == [True, False, True, True, True, True]
    assert batch.loss_mask.nonzero().tolist() == [[0, 3], [0, 4], [1, 3], [1, 4], [1, 5],
                                                  [4, 3], [5, 3], [5, 4]]  # [4, 4]: no log-prob
    torch.testing.assert_close(batch.logprobs[5, 3:5], torch.tensor([-0.3, -0.4]))
    assert batch.logprobs[4, 4] == 0 and batch.logprob_kind == "raw"
    assert batch.samples_per_prompt == 2 and batch.num_generated_tokens == 2 + 3 + 2 + 2
    with pytest.raises(RuntimeError, match="returned 1 samples for prompt 0; asked for n=2"):
        assemble_batch(prompts, prefixes, {0: completions[0][:1]}, params, stop_ids=[STOP],
                       pad_id=0, kind="raw", generation_seconds=0.1, engine="vLLM")


def test_ipc_payload_is_trtllm_serialized_handle_list():
    tensors = {"model.norm.weight": torch.ones(3), "lm_head.weight": torch.zeros(2, 3)}
    payload = ipc_payload(tensors, "GPU-abc", reduce=lambda t: ("rebuild", (t.shape,)))
    assert list(payload) == ["GPU-abc"]
    handles = pickle.loads(base64.b64decode(payload["GPU-abc"]))
    assert handles == [("model.norm.weight", ("rebuild", (torch.Size([3]),))),
                       ("lm_head.weight", ("rebuild", (torch.Size([2, 3]),)))]


def test_missing_libraries_name_the_container():
    from nemo_opd.rollout.trtllm_engine import import_tensorrt_llm
    from nemo_opd.rollout.vllm_engine import import_vllm

    for importer, words in ((import_tensorrt_llm, "TensorRT-LLM NGC container"),
                            (import_vllm, "GPU container with vLLM")):
        try:
            importer()
        except EngineUnavailable as err:
            assert isinstance(err, ImportError) and words in str(err)
            assert "containers/README.md" in str(err)
        else:  # installed (inside its container): nothing to check here
            pass


def test_check_hf_tensors_names_every_difference():
    source = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "model.embed_tokens.weight":
              torch.zeros(10, 3)}
    target = {"a": (2, 3), "c": (1,), "b": (5,), "model.embed_tokens.weight": (12, 3)}
    with pytest.raises(ValueError) as err:
        check_hf_tensors(source, target, engine="E")
    message = str(err.value)
    for part in ("E weight refit", "no tensor for 1 of the engine's (c)",
                 "2 shapes differ (b: student (4,) vs engine (5,)",
                 "the vocabularies differ: the student has 10 token rows, the engine's model 12"):
        assert part in message, message
    check_hf_tensors({"a": torch.zeros(2, 3)}, {"a": (2, 3)}, engine="E")


# ------------------------------------------------------------------- fakes of the libraries


class FakeLogprob:
    def __init__(self, logprob: float) -> None:
        self.logprob, self.rank = logprob, 1


class FakeLibrary:
    """Records what an engine asks of TensorRT-LLM or vLLM and answers like them: each sample
    writes ``10 + j, 11, STOP`` (cut to the budget), log-probs ``{token: Logprob}``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.loaded: list[dict[str, torch.Tensor]] = []

    # TensorRT-LLM
    def _collective_rpc(self, method: str, args: tuple) -> list:
        payload = args[0]
        if payload is None:
            self.calls.append(("update_weights", None))
        else:
            (uuid, blob), = payload.items()
            self.loaded.append(dict(pickle.loads(base64.b64decode(blob))))
            self.calls.append(("update_weights", uuid))
        return [None]

    # vLLM
    def collective_rpc(self, fn, args: tuple) -> list:
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(
            load_weights=lambda weights: self.loaded.append(dict(weights)))))
        self.calls.append(("collective_rpc", fn.__name__))
        return [fn(worker, *args)]

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def generate(self, inputs, sampling_params, use_tqdm):
        self.calls.append(("generate", [list(i.get("prompt_token_ids", i)) if isinstance(i, dict)
                                        else list(i) for i in inputs], list(sampling_params)))
        outputs = []
        for kwargs in sampling_params:
            samples = []
            for j in range(kwargs["n"]):
                tokens = [10 + j, 11, STOP][:kwargs["max_tokens"]]
                samples.append(SimpleNamespace(
                    index=j, token_ids=tokens,
                    logprobs=[{t: FakeLogprob(-0.25 * (k + 1))} for k, t in enumerate(tokens)],
                    finish_reason="stop" if tokens[-1] == STOP else "length"))
            outputs.append(SimpleNamespace(outputs=samples[::-1]))  # vLLM: order by .index
        return outputs


def _fake_engine_checks(model, model_dir: str, hf_params: dict[str, torch.Tensor], eos_id: int,
                        pad_id: int) -> dict:
    from nemo_opd.rollout.trtllm_engine import TensorRTLLMEngine
    from nemo_opd.rollout.vllm_engine import VLLMEngine

    out = {}
    params = SamplingParams(temperature=0.8, n=2, max_new_tokens=3, seed=4)
    prompts = [[1, 2, 3], [4, 5]]
    for name, cls, extra in (
            ("trtllm", TensorRTLLMEngine, dict(device_uuid="GPU-0", reduce_tensor=lambda t: t)),
            ("vllm", VLLMEngine, dict(sleep_level=2))):
        lib = FakeLibrary()
        engine = cls(model, model_dir, pad_id=pad_id, eos_id=eos_id, llm=lib,
                     sampling_params_cls=dict, logprob_kind="sampling", **extra)
        assert engine.logprob_kinds == ("sampling",)
        # The refit sends every HF parameter, equal to what the HF engine holds.
        (sent,) = lib.loaded
        assert sent.keys() == hf_params.keys(), (name, sent.keys() ^ hf_params.keys())
        out[f"{name}_refit_err"] = max((sent[k].float() - hf_params[k].float()).abs().max().item()
                                       for k in sent)
        batch = engine.generate(prompts, dataclasses.replace(params, stop_token_ids=(STOP,)),
                                forced_prefixes=[[], [eos_id]])
        assert batch.tokens.tolist() == [[1, 2, 3, 10, 11, STOP], [1, 2, 3, 11, 11, STOP],
                                         [4, 5, eos_id, pad_id, pad_id, pad_id],
                                         [4, 5, eos_id, pad_id, pad_id, pad_id]], name
        assert batch.logprob_kind == "sampling" and batch.stopped.all()
        torch.testing.assert_close(batch.logprobs[0, 3:6], torch.tensor([-0.25, -0.5, -0.75]))
        generate = [c for c in lib.calls if c[0] == "generate"]
        assert generate[0][1] == [[1, 2, 3]]  # the prefix-stopped prompt is not sent
        kwargs = generate[0][2][0]
        assert kwargs["stop_token_ids"] == sorted({STOP, eos_id})
        assert kwargs["n"] == 2 and kwargs["max_tokens"] == 3 and kwargs["logprobs"] == 0
        engine.update_weights(model)
        engine.generate(prompts, params)
        out[f"{name}_calls"] = [c[:2] if c[0] != "generate" else ("generate",)
                                for c in lib.calls]
    return out


# ----------------------------------------------------------------------------- HF engine, TP=1


def _write_variant(src: str, dst: Path, *, vocab_size: int | None = None,
                   tokenizer_seed: int | None = None) -> str:
    """A copy of ``src``'s config (+ tokenizer) with another vocabulary size or tokenizer; no
    weights (engines are refit, they read none)."""
    from nemo_opd.models.tiny import make_tiny_tokenizer

    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(src) / "config.json").read_text())
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    (dst / "config.json").write_text(json.dumps(config))
    if tokenizer_seed is None:
        for f in Path(src).glob("tokenizer*"):
            shutil.copy(f, dst / f.name)
    else:
        make_tiny_tokenizer(seed=tokenizer_seed).save_pretrained(dst)
    return str(dst)


def _run_config(student: str, teacher: str, train_file: str, **changes):
    from nemo_opd.config import DataConfig, ModelConfig, RunConfig

    return RunConfig(model=ModelConfig(student=student, teacher=teacher),
                     data=DataConfig(train_files=(train_file,)), **changes)


def _engine_body(dirs: dict[str, str], root: str, train_file: str) -> dict:
    from transformers import AutoTokenizer

    from nemo_opd.config import DistillConfig, RolloutConfig
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.rollout import HFEngine, MegatronEngine, check_engine, make_engine
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    qwen3, llama = dirs["qwen3"], dirs["llama"]
    tok = AutoTokenizer.from_pretrained(qwen3)
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    out: dict = {"lp_err": {}, "tokens_equal": {}, "kinds": {}, "errors": {}}
    with distributed_runtime(ParallelConfig(1)):
        # A weight-only fake-quant student (MXFP4, CPU backend) with qk-norm (qwen3).
        model = load_hf_gpt(qwen3, ParallelConfig(1))
        quantize_student(model, "mxfp4")
        megatron = MegatronEngine(model, pad_id=pad_id, eos_id=eos_id)
        cfg = _run_config(qwen3, llama, train_file, rollout=RolloutConfig(engine="hf"))
        hf = make_engine(cfg, model, None, pad_id=pad_id, eos_id=eos_id)
        assert isinstance(hf, HFEngine) and hf.dtype == torch.float32
        assert isinstance(make_engine(cfg, model, None, pad_id=pad_id, eos_id=eos_id,
                                      role="teacher"), MegatronEngine)
        check_engine(hf, model, tok, cfg)  # the student's own engine passes
        check_engine(megatron, model, tok, cfg)

        # (a) same weights: same tokens, same log-probs (both kinds, n, prefixes, stops).
        prefixes = [[], [20, 21, eos_id], [22, 23]]
        cases = {
            "greedy": (SamplingParams(temperature=0, max_new_tokens=MAX_NEW), None),
            "sampled": (SamplingParams(temperature=0.8, n=3, max_new_tokens=MAX_NEW, seed=11),
                        prefixes),
            "filtered": (SamplingParams(temperature=1.3, top_k=40, top_p=0.8, n=2,
                                        max_new_tokens=MAX_NEW, seed=5, min_new_tokens=2,
                                        stop_token_ids=(30,)), None),
            "raw": (SamplingParams(temperature=0.9, max_new_tokens=MAX_NEW, seed=3,
                                   logprobs="raw"), prefixes),
        }
        for name, (params, forced) in cases.items():
            ours, theirs = hf.generate(prompts, params, forced), megatron.generate(
                prompts, params, forced)
            out["tokens_equal"][name] = torch.equal(ours.tokens, theirs.tokens)
            assert torch.equal(ours.loss_mask, theirs.loss_mask)
            assert torch.equal(ours.stopped, theirs.stopped)
            out["kinds"][name] = (ours.logprob_kind, theirs.logprob_kind)
            out["lp_err"][name] = (ours.logprobs - theirs.logprobs).abs().max().item()
            assert ours.generation_seconds > 0

        # (b) refit: an in-place change of a quantized weight shows only after update_weights.
        params = cases["sampled"][0]
        before = hf.generate(prompts, params)
        pointers = {n: p.data_ptr() for n, p in hf.hf_model.named_parameters()}
        linear = model.decoder.layers[0].self_attention.linear_qkv
        with torch.no_grad():
            linear.weight.add_(0.2 * torch.randn_like(linear.weight))
            model.output_layer.weight.mul_(1.5)
        moved = megatron.generate(prompts, params)
        stale = hf.generate(prompts, params)
        out["stale_equal_before"] = torch.equal(stale.logprobs, before.logprobs)
        out["stale_vs_moved"] = (stale.logprobs - moved.logprobs).abs().max().item()
        hf.update_weights(model)
        refit = hf.generate(prompts, params)
        out["refit_err"] = (refit.logprobs - moved.logprobs).abs().max().item()
        out["refit_tokens_equal"] = torch.equal(refit.tokens, moved.tokens)
        out["in_place"] = pointers == {n: p.data_ptr() for n, p in hf.hf_model.named_parameters()}
        hf_params = {n: p.detach().clone() for n, p in hf.hf_model.named_parameters()}

        # TensorRT-LLM and vLLM engines against fakes of their libraries.
        out.update(_fake_engine_checks(model, qwen3, hf_params, eos_id, pad_id))

        # (c) bad inputs, each a ValueError naming the problem.
        errors = out["errors"]

        def error(name: str, call) -> None:
            with pytest.raises(ValueError) as err:
                call()
            errors[name] = str(err.value)

        root_path = Path(root)
        big = _write_variant(qwen3, root_path / "vocab512", vocab_size=512)
        small = _write_variant(qwen3, root_path / "vocab256", vocab_size=256)
        other_tok = _write_variant(qwen3, root_path / "tokenizer1", tokenizer_seed=1)
        error("vocab_larger", lambda: HFEngine(model, big, pad_id=pad_id, eos_id=eos_id))
        error("vocab_smaller", lambda: HFEngine(model, small, pad_id=pad_id, eos_id=eos_id))
        error("check_vocab", lambda: check_engine(SimpleNamespace(vocab_size=500), model, tok,
                                                  cfg))
        error("tokenizer", lambda: check_engine(
            HFEngine(model, other_tok, pad_id=pad_id, eos_id=eos_id), model, tok, cfg))
        error("eos", lambda: check_engine(HFEngine(model, qwen3, pad_id=pad_id, eos_id=pad_id),
                                          model, tok, cfg))
        error("shapes", lambda: HFEngine(model, llama, pad_id=pad_id, eos_id=eos_id))
        llama_model = load_hf_gpt(llama, ParallelConfig(1))
        kept = {n: p.detach().clone() for n, p in hf.hf_model.named_parameters()}
        error("refit_other_model", lambda: hf.update_weights(llama_model))
        out["unchanged_after_refused_refit"] = all(
            torch.equal(p, kept[n]) for n, p in hf.hf_model.named_parameters())
        from nemo_opd.rollout.trtllm_engine import TensorRTLLMEngine

        error("trtllm_shapes", lambda: TensorRTLLMEngine(
            model, llama, pad_id=pad_id, eos_id=eos_id, llm=FakeLibrary(),
            sampling_params_cls=dict, device_uuid="GPU-0", reduce_tensor=lambda t: t))
        error("prompt_vocab", lambda: hf.generate([[1, hf.vocab_size]], params))
        error("prompt_long", lambda: hf.generate([[1] * 256], params))

        no_logprobs = SimpleNamespace(returns_logprobs=False, vocab_size=hf.vocab_size)
        raw_only = SimpleNamespace(logprob_kinds=("raw",), vocab_size=hf.vocab_size)
        error("no_logprobs_importance", lambda: check_engine(no_logprobs, model, tok, cfg))
        sampled = dataclasses.replace(cfg, rollout=RolloutConfig(engine="hf", importance="none"),
                                      distill=DistillConfig(loss="sampled"))
        error("no_logprobs_sampled_loss", lambda: check_engine(no_logprobs, model, tok, sampled))
        error("kind", lambda: check_engine(raw_only, model, tok, dataclasses.replace(
            cfg, sampling=SamplingParams(temperature=0.7, logprobs="sampling"))))
        # Not needed, not refused: no importance correction and a loss without them; greedy.
        check_engine(no_logprobs, model, tok, dataclasses.replace(
            cfg, rollout=RolloutConfig(engine="hf", importance="none")))
        check_engine(raw_only, model, tok, dataclasses.replace(
            cfg, sampling=SamplingParams(temperature=0, logprobs="sampling")))
    return out


@pytest.mark.multirank
def test_hf_engine_matches_megatron_refits_and_rejects_bad_inputs(tiny_model_dirs, tmp_path,
                                                                  train_file):
    (out,) = run_ranks(_engine_body, world_size=1, dirs=tiny_model_dirs, root=str(tmp_path),
                       train_file=train_file)
    # (a) fp32, weight-only fake quant: the same tokens, log-probs to 1e-4 (seen ~5e-7).
    assert all(out["tokens_equal"].values()), out["tokens_equal"]
    assert all(err < 1e-4 for err in out["lp_err"].values()), out["lp_err"]
    assert out["kinds"] == {"greedy": ("raw", "raw"), "sampled": ("sampling", "sampling"),
                            "filtered": ("sampling", "sampling"), "raw": ("raw", "raw")}
    # (b) without update_weights the HF engine keeps the old policy; with it, the new one.
    assert out["stale_equal_before"] and out["stale_vs_moved"] > 1e-2
    assert out["refit_err"] < 1e-4 and out["refit_tokens_equal"] and out["in_place"]
    # Fakes: refit payloads are the HF engine's tensors; the calls come in the documented order.
    assert out["trtllm_refit_err"] == 0 and out["vllm_refit_err"] == 0
    assert out["trtllm_calls"] == [("update_weights", "GPU-0"), ("update_weights", None),
                                   ("generate",),
                                   ("update_weights", "GPU-0"), ("update_weights", None),
                                   ("generate",)]
    assert out["vllm_calls"] == [
        ("collective_rpc", "load_weights_on_worker"), ("reset_prefix_cache",), ("sleep", 2),
        ("wake_up", ("weights", "kv_cache")), ("generate",), ("sleep", 2),
        ("wake_up", ("weights",)), ("collective_rpc", "load_weights_on_worker"),
        ("reset_prefix_cache",), ("wake_up", ("kv_cache",)), ("generate",), ("sleep", 2)]
    # (c) each bad input is refused with a message naming it.
    errors = out["errors"]
    expected = {
        "vocab_larger": "the vocabularies differ: the student has 384 token rows, the engine's "
                        "model 512",
        "vocab_smaller": "the engine's vocabulary has 256 entries but the student's "
                         "model.embed_tokens.weight has 384 rows whose rows >= 256 are real "
                         "tokens",
        "check_vocab": "its vocabulary has 500 entries, the student's 384",
        "tokenizer": "its tokenizer differs from the trainer's:",
        "eos": "it ends rows on EOS id",
        "shapes": "HFEngine weight refit: the student's weights do not fit the engine's model",
        "refit_other_model": "HFEngine weight refit",
        "trtllm_shapes": "TensorRTLLMEngine weight refit",
        "prompt_vocab": "prompt 0 holds ids outside the vocabulary [0, 384)",
        "prompt_long": "prompt 0 has 256 tokens",
        "no_logprobs_importance": "it returns no log-probs, but rollout.importance='truncate'",
        "no_logprobs_sampled_loss": "it returns no log-probs, but distill.loss='sampled'",
        "kind": "it records raw log-probs, but the run samples with sampling.logprobs="
                "'sampling'",
    }
    for name, fragment in expected.items():
        assert fragment in errors[name], (name, errors[name])
    assert "self_attn.q_norm.weight" in errors["shapes"]  # what the llama engine lacks
    assert "cannot serve this run" in errors["check_vocab"]
    assert out["unchanged_after_refused_refit"]


# ----------------------------------------------------------------------------- TP=2 gather


def _tp2_body(model_dir: str) -> dict:
    from megatron.core import parallel_state

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.rollout import HFEngine, MegatronEngine
    from nemo_opd.rollout.hf_engine import student_hf_tensors
    from nemo_opd.runtime import ParallelConfig, distributed_runtime, model_process_groups

    out = {}
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2)):
        rank = parallel_state.get_tensor_model_parallel_rank()
        models = {2: load_hf_gpt(model_dir, ParallelConfig(2)),
                  1: load_hf_gpt(model_dir, ParallelConfig(1),
                                 pg_collection=model_process_groups(ParallelConfig(1)))}
        for model in models.values():
            quantize_student(model, "mxfp4")
        tensors = {tp: student_hf_tensors(model) for tp, model in models.items()}
        assert tensors[1].keys() == tensors[2].keys()
        out["gather_err"] = max((tensors[1][k] - tensors[2][k]).abs().max().item()
                                for k in tensors[1])
        params = SamplingParams(temperature=0.8, n=2, max_new_tokens=MAX_NEW, seed=3)
        prompts = [[1, 5, 9, 13], [2, 4]]
        hf = HFEngine(models[2], model_dir, pad_id=0, eos_id=None)
        megatron = MegatronEngine(models[2], pad_id=0, eos_id=None)
        ours, theirs = hf.generate(prompts, params), megatron.generate(prompts, params)
        out["tokens_equal"] = torch.equal(ours.tokens, theirs.tokens)
        out["lp_err"] = (ours.logprobs - theirs.logprobs).abs().max().item()
        # Unseeded: each rank draws its own seed, the group samples with TP rank 0's.
        torch.manual_seed(100 + rank)
        out["unseeded"] = hf.generate(prompts, dataclasses.replace(params, seed=None)).tokens
    return out


@pytest.mark.multirank
def test_hf_engine_gathers_tp2_shards(tiny_model_dirs):
    first, second = run_ranks(_tp2_body, world_size=2, model_dir=tiny_model_dirs["llama"])
    for out in (first, second):
        assert out["gather_err"] == 0  # the TP=2 shards gather into the TP=1 tensors exactly
        assert out["tokens_equal"] and out["lp_err"] < 1e-4
    assert torch.equal(first["unseeded"], second["unseeded"])  # one seed for the TP group


# ----------------------------------------------------------------------------- config checks


def test_rollout_setup_refused_before_models_load(tiny_model_dirs, train_file):
    from nemo_opd.config import RolloutConfig
    from nemo_opd.rollout import SamplingParams
    from nemo_opd.rollout.factory import check_rollout_setup

    llama, qwen3 = tiny_model_dirs["llama"], tiny_model_dirs["qwen3"]
    for engine in ("megatron", "hf"):
        check_rollout_setup(_run_config(llama, qwen3, train_file,
                                        rollout=RolloutConfig(engine=engine)))
    for engine, library in (("trtllm", "TensorRT-LLM"), ("vllm", "vLLM")):
        with pytest.raises(ValueError, match=f"needs {library}.*not installed here"):
            check_rollout_setup(_run_config(llama, qwen3, train_file,
                                            rollout=RolloutConfig(engine=engine)))
    with pytest.raises(ValueError, match="cannot honour sampling.min_new_tokens=2"):
        check_rollout_setup(_run_config(llama, qwen3, train_file,
                                        rollout=RolloutConfig(engine="trtllm"),
                                        sampling=SamplingParams(max_new_tokens=8,
                                                                min_new_tokens=2)))


def test_smoke_script_passes_with_the_hf_engine():
    """containers/smoke_engine.py, as run in the TensorRT-LLM / vLLM containers, here with the
    HF engine in fp32: equal tokens, refit followed."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "containers" / "smoke_engine.py"),
                           "--engine", "hf", "--dtype", "float32", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "PASS" and sum(line.startswith("[ok]") for line in lines) == 5, lines
    assert "100.0% equal after update_weights" in done.stdout


# ----------------------------------------------------------------------------- end to end


class GapRecorder:
    """The HF engine, plus the trainer's own log-probs of every rollout (a teacher-forced
    forward of the student): the engine-vs-trainer gap the importance weights correct for."""

    def __init__(self, inner, model, gaps: list) -> None:
        self.inner, self.model, self.gaps = inner, model, gaps
        self.logprob_kinds, self.vocab_size = inner.logprob_kinds, inner.vocab_size
        self.tokenizer, self.eos_id = inner.tokenizer, inner.eos_id

    def generate(self, prompts, params, forced_prefixes=None):
        batch = self.inner.generate(prompts, params, forced_prefixes)
        ids = batch.tokens
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                logits = self.model(ids, positions, None, runtime_gather_output=True).float()
        finally:
            self.model.train(training)
        trainer = torch.zeros_like(batch.logprobs)
        trainer[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(
            -1, ids[:, 1:, None]).squeeze(-1)
        gap = (batch.logprobs - trainer)[batch.loss_mask].abs()
        self.gaps.append((gap.max().item(), gap.mean().item()))
        return batch

    def update_weights(self, model) -> None:
        self.inner.update_weights(model)


def _e2e_body(dirs: dict[str, str], train_file: str, root: str) -> dict:
    from transformers import AutoTokenizer

    from nemo_opd.config import (
        DataConfig,
        DistillConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        QuantConfig,
        RolloutConfig,
        RunConfig,
    )
    from nemo_opd.rollout import check_engine, make_engine
    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train import Trainer, run_distillation

    tok = AutoTokenizer.from_pretrained(dirs["llama"])
    cfg = RunConfig(
        model=ModelConfig(student=dirs["llama"], teacher=dirs["qwen3"]),
        data=DataConfig(train_files=(train_file,), max_response_length=8),
        quant=QuantConfig(format="mxfp4", calibration_batches=1),
        # Fully on-policy: every batch is the HF engine's; temperature 1, no filtering, so the
        # engine's "sampling" log-probs are the student's softmax and comparable as they are.
        distill=DistillConfig(lmbda=1.0, beta=0.5),
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
        rollout=RolloutConfig(engine="hf", importance="truncate", importance_cap=2.0),
        optim=OptimConfig(steps=12, micro_batch_size=2, lr=1e-2, warmup_steps=2, min_lr=1e-3),
        logging=LoggingConfig(progress_bar=False, tensorboard=False),
        output_dir=root, seed=7)
    gaps: list = []
    built: list = []

    def factory(model, tp_group):
        # The engine in bf16 next to the fp32 trainer: its log-probs differ a little.
        engine = make_engine(cfg, model, tp_group, pad_id=tok.pad_token_id,
                             eos_id=tok.eos_token_id, dtype=torch.bfloat16)
        check_engine(engine, model, tok, cfg)
        built.append(type(engine).__name__)
        return GapRecorder(engine, model, gaps)

    with distributed_runtime(ParallelConfig(1), seed=7):
        result = run_distillation(cfg, engine_factory=factory)
        # Without a factory the trainer builds (and checks) rollout.engine's before step 0.
        default = Trainer(dataclasses.replace(cfg, output_dir=root + "_default"))
    return {"losses": [h["loss"] for h in result.history], "gaps": gaps, "built": built,
            "history": result.history, "default_engine": type(default._engine).__name__}


@pytest.mark.multirank
def test_hf_engine_end_to_end_training(tiny_model_dirs, train_file, tmp_path):
    (out,) = run_ranks(_e2e_body, world_size=1, dirs=tiny_model_dirs, train_file=train_file,
                       root=str(tmp_path / "run"), timeout=900)
    losses, gaps = out["losses"], out["gaps"]
    assert out["built"] == ["HFEngine"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert all(h["sources"] == ["rollout"] for h in out["history"])
    # The bf16 engine samples from a slightly different policy than the fp32 trainer: the gap
    # is non-zero but small, at every step (the engine was refit after every optimizer step —
    # a stale engine's gap would grow with the training).
    assert len(gaps) == 12
    assert all(1e-4 < mean < 0.05 and biggest < 0.5 for biggest, mean in gaps), gaps
    # The trainer measured the same gap and weighted by it: ratios near 1 but not 1 (bf16),
    # reported every step, min <= mean <= max, KL(μ‖πθ) small and nothing masked (truncate).
    for step in out["history"]:
        low, mean, high = (step[f"importance_ratio_{k}"] for k in ("min", "mean", "max"))
        assert 0.3 < low <= mean <= high < 3.0 and low < 1.0 < high and high - low > 1e-4, step
        assert abs(step["importance_kl"]) < 0.05 and step["importance_masked_fraction"] == 0.0
    # The engine the trainer built is the one rollout.engine names (no factory passed).
    assert out["default_engine"] == "HFEngine"
