"""Evaluation: MegatronLM against lm-eval's own HFLM (a peer, not a self-check), TP=2 against
TP=1, offline end-to-end runs of local tasks scored against a float64 Hugging Face reference and
of benchmark tasks from local copies, exported checkpoints dequantised against ModelOpt's fake
quantizers and against the fake-quant student, the in-loop hook, the results table, the CLI, and
bad input.

Process start costs ~4 s per rank, so every model check runs in one 2-rank job: each rank holds
the model at TP=2 (global layout) and at TP=1 (its own process groups) plus lm-eval's HFLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multirank import run_ranks

LOGLIK_TOL = 1e-4
ROLLING_MAX_LENGTH = 24  # small, so a document spans several rolling windows

GEN_BUDGET = 32  # LocalTask's default max_gen_toks: the reference generates as far as the task

LOGLIK_REQUESTS = [
    ("question: what is 12 plus 30? answer:", " 42"),
    ("the cat sees a", " dog and the bird"),
    ("", "red fish likes the blue"),          # empty context: prefix token
    ("one two three ", "four five"),          # trailing space moves to the continuation
    ("how many", " cats"),
]
ROLLING_DOCS = ["the small cat runs and the big dog eats the fish " * 4, "one two"]
GEN_REQUESTS = [
    ("question: what is 3 plus 4? answer:", {"until": ["\n"], "max_gen_toks": 8,
                                             "do_sample": False}),
    ("the dog", {"until": ["fish"], "max_gen_toks": 6, "do_sample": False}),
    ("red blue green", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}),
]


# ------------------------------------------------------------------ float64 HF reference


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


@torch.no_grad()
def _hf_continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) split as lm-eval splits it (encode whole, cut at context)."""
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


@torch.no_grad()
def _hf_greedy(model, tok, prompt: str, max_new: int, stop: str) -> str:
    out = model.generate(torch.tensor([tok.encode(prompt)]), do_sample=False,
                         max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(tok.encode(prompt)):], skip_special_tokens=True).split(stop)[0]


@torch.no_grad()
def _greedy_pairs(model, tok) -> list[tuple[str, str]]:
    """``(context, top-1 token text)`` and ``(context, top-2 token text)`` for the first context
    whose two most likely next tokens survive decode → re-encode after it."""
    for words in ("the cat", "one two three", "question: what is", "red blue", "the dog sees"):
        ids = tok.encode(words)
        ranked = model(torch.tensor([ids])).logits[0, -1].argsort(descending=True)[:2].tolist()
        texts = [tok.decode([t]) for t in ranked]
        if all(tok.encode(words + text) == ids + [t] for text, t in zip(texts, ranked,
                                                                       strict=True)):
            return [(words, text) for text in texts]
    raise AssertionError("no context with round-trippable top tokens")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _local_task_files(tmp_path: Path, model_dir: str):
    """A multiple-choice and a generative task whose expected scores follow from the float64
    HF model: gold is its top choice (MC) / its greedy answer (generation) on exactly half the
    records; and :func:`_greedy_pairs`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = _hf_model(model_dir)
    mc, gen = [], []
    for i in range(6):
        query = f"question: what is {i} plus {i + 3}? answer:"
        choices = [str(i + 3 + i), "cat", f"{i} fish", "blue"]
        scores = [_hf_continuation_logprob(model, tok, query, " " + c) for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        gold = best if i % 2 == 0 else (best + 1) % len(choices)
        mc.append({"query": query, "choices": choices, "gold": gold})
        question = f"the {['cat', 'dog', 'bird'][i % 3]} sees {i} fish and"
        answer = _hf_greedy(model, tok, question, GEN_BUDGET, "\n").strip()
        gen.append({"question": question, "answer": answer if i % 2 == 0 else "zz wrong"})
    files = {"arith_mc": _write_jsonl(tmp_path / "arith_mc.jsonl", mc),
             "story_gen": _write_jsonl(tmp_path / "story_gen.jsonl", gen)}
    return files, {"arith_mc": 0.5, "story_gen": 0.5}, _greedy_pairs(model, tok)


def _benchmark_copies(data_dir: Path) -> None:
    """Three records each of HellaSwag, ARC-Easy and WinoGrande in the hub's schemas, where
    ``data_dir`` expects them (the evaluated split of each: validation, test, validation)."""
    hellaswag = [{"ind": i, "activity_label": "Pets", "ctx_a": "The cat sees a dog.",
                  "ctx_b": "it", "ctx": "The cat sees a dog. it", "source_id": "x",
                  "split": "val", "split_type": "indomain", "label": str(i),
                  "endings": ["runs fast.", "eats the fish.", "likes the bird.", "is red."]}
                 for i in range(3)]
    arc = [{"id": str(i), "question": f"What is {i} plus one?", "answerKey": "A",
            "choices": {"text": [str(i + 1), "cat", "dog", "fish"], "label": list("ABCD")}}
           for i in range(3)]
    winogrande = [{"sentence": f"The cat sees {i} dogs because _ is big.", "option1": "the cat",
                   "option2": "the dog", "answer": "2"} for i in range(3)]
    for parts, records in ((("Rowan", "hellaswag", "default", "validation"), hellaswag),
                           (("allenai", "ai2_arc", "ARC-Easy", "test"), arc),
                           (("allenai", "winogrande", "winogrande_xl", "validation"), winogrande)):
        folder = data_dir.joinpath(*parts[:-1])
        folder.mkdir(parents=True)
        _write_jsonl(folder / f"{parts[-1]}.jsonl", records)


# ------------------------------------------------------------------ the 2-rank job


def _instances(kind: str, args: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a if isinstance(a, tuple) else (a,), i) for i, a in
            enumerate(args)]


def _requests(lm) -> dict:
    return {
        "loglikelihood": lm.loglikelihood(_instances("loglikelihood", LOGLIK_REQUESTS)),
        "rolling": lm.loglikelihood_rolling(_instances("loglikelihood_rolling", ROLLING_DOCS)),
        "generate": lm.generate_until(_instances("generate_until", GEN_REQUESTS)),
    }


def _unknown_word_tokenizer():
    """A word-level tokenizer over the model's ids that maps unseen words to ``<pad>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, "<pad>": 3, "the": 10, "cat": 11, "dog": 12}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<pad>")


def _run_hook(model, tok, task_files: dict[str, str], out_dir: Path) -> dict:
    """Five training steps with an evaluation every second one, as the trainer calls it."""
    from nemo_opd.eval import make_eval_hook

    seen = []
    hook = make_eval_hook(["arith_mc"], every_n_steps=2, tokenizer=tok, local_tasks=task_files,
                          out_dir=out_dir / "hook", on_result=lambda step, r: seen.append(step))
    model.train()
    rng = torch.get_rng_state()
    returned = [hook(model, step) for step in range(5)]
    return {"returned": returned, "history": [(r["step"], r["tasks"]["arith_mc"]["value"])
                                              for r in hook.history],
            "on_result": seen, "training": model.training,
            "rng_untouched": torch.equal(rng, torch.get_rng_state())}


def _eval_job(model_dirs: dict[str, str], task_files: dict[str, str], hub_dir: str,
              cli_out: str, greedy_pairs: list[tuple[str, str]]) -> dict:
    from lm_eval.models.huggingface import HFLM
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    from nemo_opd.eval import LMConfig, MegatronLM, TokenizerRoundTripError, evaluate_model
    from nemo_opd.eval.cli import main as eval_main
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.runtime import ParallelConfig, distributed_runtime, model_process_groups

    out: dict = {"families": {}}
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2)):
        # The CLI inside a running TP=2 job uses its runtime; rank 0 writes the report.
        out["cli_code"] = eval_main([
            "--model", model_dirs["llama"], "--tp", "2", "--tasks", "arith_mc", "--local-task",
            f"arith_mc={task_files['arith_mc']}", "--name", "cli", "--out", cli_out])
        tp1_groups = model_process_groups(ParallelConfig(1))
        for family, model_dir in model_dirs.items():
            tok = AutoTokenizer.from_pretrained(model_dir)
            config = LMConfig(batch_size=3, max_length=ROLLING_MAX_LENGTH)
            tp2 = MegatronLM(load_hf_gpt(model_dir, ParallelConfig(2)), tok, config)
            tp1 = MegatronLM(load_hf_gpt(model_dir, ParallelConfig(1),
                                         pg_collection=tp1_groups), tok, config)
            assert tp2._tp_group is parallel_state.get_tensor_model_parallel_group()
            hf = HFLM(pretrained=model_dir, device="cpu", batch_size=3, dtype="float32",
                      max_length=ROLLING_MAX_LENGTH)
            out["families"][family] = {"tp2": _requests(tp2), "tp1": _requests(tp1),
                                       "hflm": _requests(hf)}
            if family == "llama":
                out["greedy_flags"] = [[greedy for _, greedy in lm.loglikelihood(
                    _instances("loglikelihood", greedy_pairs))] for lm in (tp2, tp1, hf)]
                # The model's full context (the rolling checks above cap it at 24 tokens).
                full = {name: MegatronLM(lm.model, tok) for name, lm in (("tp2", tp2),
                                                                       ("tp1", tp1))}
                out["records"] = {name: evaluate_model(lm, [], local_tasks=task_files,
                                                       run_name=name)
                                  for name, lm in full.items()}
                out["hub"] = evaluate_model(full["tp2"], ["hellaswag", "arc_easy", "winogrande"],
                                            data_dir=hub_dir)
                out["hook"] = _run_hook(tp2.model, tok, task_files, Path(cli_out).parent)
                bad = MegatronLM(tp2.model, _unknown_word_tokenizer())
                try:
                    bad.loglikelihood(_instances("loglikelihood", [("the cat", " ate zebras")]))
                except TokenizerRoundTripError as err:
                    out["round_trip_error"] = str(err)
                out["request_errors"] = []
                for gen_kwargs in ({"until": ["\n"], "max_gen_toks": ROLLING_MAX_LENGTH},
                                   {"until": ["\n"], "do_sample": True, "temperature": 0.7}):
                    try:
                        tp2.generate_until(_instances("generate_until", [("the cat", gen_kwargs)]))
                    except ValueError as err:
                        out["request_errors"].append(str(err))
    return out


@pytest.fixture(scope="module")
def eval_job(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    task_files, expected, greedy_pairs = _local_task_files(root, tiny_model_dirs["llama"])
    hub_dir = root / "hub"
    _benchmark_copies(hub_dir)
    results = run_ranks(_eval_job, world_size=2, timeout=600, model_dirs=tiny_model_dirs,
                        task_files={k: str(v) for k, v in task_files.items()},
                        hub_dir=str(hub_dir), cli_out=str(root / "cli" / "report"),
                        greedy_pairs=greedy_pairs)
    return results, expected, root


@pytest.mark.multirank
def test_loglikelihoods_match_lm_eval_hflm_at_tp1_and_tp2(eval_job):
    results, _, _ = eval_job
    for rank_result in results:
        for family, runs in rank_result["families"].items():
            reference = runs["hflm"]
            for layout in ("tp1", "tp2"):
                ours = runs[layout]
                for (lp, greedy), (ref_lp, ref_greedy) in zip(
                        ours["loglikelihood"], reference["loglikelihood"], strict=True):
                    assert abs(lp - ref_lp) < LOGLIK_TOL, (family, layout, lp, ref_lp)
                    assert greedy == ref_greedy, (family, layout)
                for total, ref_total in zip(ours["rolling"], reference["rolling"], strict=True):
                    assert abs(total - ref_total) < LOGLIK_TOL, (family, layout, total, ref_total)
                assert ours["generate"] == reference["generate"], (family, layout)
    # Non-trivial inputs: several rolling windows and real generated text.
    assert results[0]["families"]["llama"]["hflm"]["rolling"][0] < -100
    assert any(results[0]["families"]["llama"]["hflm"]["generate"])
    # The float64 reference's top-1 next token is greedy for all three, its top-2 is not.
    assert results[0]["greedy_flags"] == [[True, False]] * 3


@pytest.mark.multirank
def test_tp2_equals_tp1_and_ranks_agree(eval_job):
    results, _, _ = eval_job
    assert results[0]["families"] == results[1]["families"]
    for runs in results[0]["families"].values():
        for (lp2, g2), (lp1, g1) in zip(runs["tp2"]["loglikelihood"],
                                        runs["tp1"]["loglikelihood"], strict=True):
            assert abs(lp2 - lp1) < 1e-5 and g2 == g1
        assert runs["tp2"]["generate"] == runs["tp1"]["generate"]
    tp2, tp1 = results[0]["records"]["tp2"], results[0]["records"]["tp1"]
    assert {t: c["value"] for t, c in tp2["tasks"].items()} == \
        {t: c["value"] for t, c in tp1["tasks"].items()}


@pytest.mark.multirank
def test_offline_local_tasks_score_as_the_float64_reference(eval_job):
    results, expected, _ = eval_job
    record = results[0]["records"]["tp2"]
    assert record["numerics"] == "megatron fp32"
    for task, value in expected.items():
        assert record["tasks"][task]["n"] == 6
        assert record["tasks"][task]["value"] == pytest.approx(value), (task, record["tasks"])
    assert record["average"] == pytest.approx(sum(expected.values()) / len(expected))
    hub = results[0]["hub"]["tasks"]
    assert {task: (cell["label"], cell["metric"], cell["n"]) for task, cell in hub.items()} == {
        "hellaswag": ("HellaSwag", "acc_norm,none", 3), "arc_easy": ("ARC-E", "acc_norm,none", 3),
        "winogrande": ("WinoGr", "acc,none", 3)}


@pytest.mark.multirank
def test_cli_eval_at_tp2_writes_table_json_and_plot(eval_job):
    results, expected, root = eval_job
    assert [r["cli_code"] for r in results] == [0, 0]
    report = json.loads((root / "cli" / "report.json").read_text())
    (record,) = report["records"]
    assert record["run"] == "cli"
    assert record["tasks"]["arith_mc"]["value"] == pytest.approx(expected["arith_mc"])
    markdown = (root / "cli" / "report.md").read_text()
    assert "| cli | megatron fp32 | 0.500 | 0.500 | – |" in markdown
    _check_plot(root / "cli" / "report.png", report)


@pytest.mark.multirank
def test_in_loop_hook_evaluates_every_n_steps_and_leaves_training_alone(eval_job):
    results, expected, root = eval_job
    for rank, result in enumerate(results):
        hook = result["hook"]
        metrics = {"eval/arith_mc": expected["arith_mc"], "eval/average": expected["arith_mc"]}
        assert hook["returned"] == [None, None, metrics, None, metrics]
        assert hook["history"] == [(2, expected["arith_mc"]), (4, expected["arith_mc"])]
        assert hook["training"] and hook["rng_untouched"]
        assert hook["on_result"] == ([2, 4] if rank == 0 else [])  # rank 0 reports
    written = json.loads((root / "cli" / "hook" / "step_4.json").read_text())
    assert written["run"] == "student@4" and written["step"] == 4


@pytest.mark.multirank
def test_bad_requests_are_refused_before_any_forward(eval_job):
    results, _, _ = eval_job
    message = results[0]["round_trip_error"]
    assert "cannot round-trip" in message and "zebras" in message
    budget, sampling = results[0]["request_errors"]
    assert f"max_gen_toks = {ROLLING_MAX_LENGTH} leaves no room" in budget
    assert "decodes greedily only" in sampling


def _check_plot(path: Path, report: dict) -> None:
    """matplotlib is a dependency: the PNG must be there."""
    assert report["plot"] == path.name and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ results table


def _record(run: str, role: str | None, values: dict[str, float]) -> dict:
    from nemo_opd.eval.evaluate import RESULT_SCHEMA

    return {"schema": RESULT_SCHEMA, "run": run, "role": role, "numerics": "megatron fp32",
            "tasks": {t: {"label": t.upper(), "metric": "acc,none", "value": v, "stderr": None,
                          "n": 10} for t, v in values.items()},
            "average": sum(values.values()) / len(values)}


def test_table_average_and_ptq_gap_recovered(tmp_path):
    from nemo_opd.eval.cli import main as eval_main

    records = [_record("teacher", "teacher", {"a": 0.8, "b": 0.6}),
               _record("ptq", "ptq", {"a": 0.5, "b": 0.3}),
               _record("opd", "student", {"a": 0.7, "b": 0.55, "c": 0.1})]
    paths = []
    for record in records:
        paths.append(tmp_path / f"{record['run']}.json")
        paths[-1].write_text(json.dumps(record))
    assert eval_main(["compare", *map(str, paths), "--out", str(tmp_path / "table")]) == 0
    report = json.loads((tmp_path / "table.json").read_text())
    rows = {row["run"]: row for row in report["table"]["rows"]}
    assert report["table"]["average_over"] == ["a", "b"]  # "c" is not in every row
    teacher, ptq, opd = 0.7, 0.4, 0.625
    assert rows["opd"]["average"] == pytest.approx(opd)
    assert rows["opd"]["gap_recovered"] == pytest.approx((opd - ptq) / (teacher - ptq))
    assert rows["teacher"]["gap_recovered"] is None
    markdown = (tmp_path / "table.md").read_text()
    assert "| Run | Numerics | A | B | C | Avg (a, b) | PTQ gap recovered |" in markdown
    assert "| opd | megatron fp32 | 0.700 | 0.550 | 0.100 | 0.625 | 75.0% |" in markdown
    _check_plot(tmp_path / "table.png", report)
    # --ptq overrides the roles in the files: the student row becomes the baseline.
    assert eval_main(["compare", *map(str, paths), "--out", str(tmp_path / "t2"),
                      "--ptq", "opd"]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "t2.json").read_text())["table"]["rows"]}
    assert rows["ptq"]["gap_recovered"] == pytest.approx((0.4 - opd) / (teacher - opd))


def test_compare_bad_input(tmp_path, capsys):
    from nemo_opd.eval.cli import main as eval_main

    assert eval_main(["compare", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"results": {}}))
    assert eval_main(["compare", str(tmp_path / "other.json"), "--out", str(tmp_path / "o")]) == 2
    assert "not a nemo_opd evaluation result" in capsys.readouterr().err


# ------------------------------------------------------------------ exported checkpoints


@pytest.mark.parametrize(("algo", "modelopt_name", "attrs"), [
    ("FP8", "fp8", {"num_bits": (4, 3), "axis": None}),
    ("INT8_WO", "int8_wo", {"num_bits": 8, "axis": 0}),
    ("INT4_AWQ", "int4_awq", {"num_bits": 4, "block_sizes": {-1: 128}}),
])
def test_dequantised_export_equals_modelopt_fake_quant(algo, modelopt_name, attrs):
    """Packed by ModelOpt's exporter helper, dequantised here == ModelOpt's fake quantizer."""
    from modelopt.torch.export.quant_utils import to_quantized_weight
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    from nemo_opd.eval.exported import dequantize_tensors

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    quantizer = TensorQuantizer(QuantizerAttributeConfig(**attrs)).eval()
    if algo == "INT4_AWQ":
        scale = weight.reshape(64, 2, 128).abs().amax(-1) / 7.0
    else:
        amax = weight.abs().amax(dim=None if algo == "FP8" else 1, keepdim=algo != "FP8")
        quantizer.amax = amax
        scale = (amax / 448.0) if algo == "FP8" else amax.squeeze(1) / 127.0
    reference = quantizer(weight)
    packed = to_quantized_weight(weight, scale, modelopt_name, block_size=128)
    pre_quant = torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.5
    tensors = {"l.weight": packed, "l.weight_scale": scale, "l.bias": torch.ones(64)}
    plain = dequantize_tensors(tensors, {"quant_algo": algo}, dtype=torch.float32)
    assert set(plain) == {"l.weight", "l.bias"}
    torch.testing.assert_close(plain["l.weight"], reference, rtol=0, atol=1e-6)
    assert (plain["l.weight"] - weight).abs().max() > 1e-3  # the codes really are quantized
    if algo == "INT4_AWQ":  # AWQ's activation scale folds into the weight's input columns
        folded = dequantize_tensors({**tensors, "l.pre_quant_scale": pre_quant},
                                    {"quant_algo": algo}, dtype=torch.float32)["l.weight"]
        torch.testing.assert_close(folded, reference * pre_quant, rtol=0, atol=1e-6)


def test_export_dir_dequantises_to_a_plain_hf_model(tiny_model_dirs, tmp_path):
    """An FP8 unified checkpoint (weights packed by ModelOpt) → HF directory whose logits equal
    the original model's with fake-quantized weights (float64 reference)."""
    import shutil

    from modelopt.torch.export.quant_utils import to_quantized_weight
    from safetensors.torch import load_file, save_file

    from nemo_opd.eval.exported import dequantize_export, read_quant_config

    source = Path(tiny_model_dirs["llama"])
    export = tmp_path / "export"
    shutil.copytree(source, export)
    tensors = load_file(source / "model.safetensors")
    packed, fake_quant = {}, {}
    for name, value in tensors.items():
        if name.endswith("proj.weight"):
            scale = value.abs().amax().float() / 448.0
            packed[name] = to_quantized_weight(value, scale, "fp8")
            packed[name.replace(".weight", ".weight_scale")] = scale
            fake_quant[name] = packed[name].double() * scale.double()
        else:
            packed[name] = value
    save_file(packed, export / "model.safetensors")
    (export / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}}))
    assert read_quant_config(export)["quant_algo"] == "FP8"
    plain = dequantize_export(export, tmp_path / "plain", dtype=torch.float32)
    assert not (plain / "hf_quant_config.json").exists()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = _hf_model(str(source))
    reference.load_state_dict({**{k: v.double() for k, v in tensors.items()}, **fake_quant},
                              strict=False)
    with torch.no_grad():
        expected = reference(ids).logits
        actual = _hf_model(str(plain))(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max())
    # The same export through the command line: lm-eval's HFLM on the dequantised weights.
    from nemo_opd.eval.cli import main as eval_main

    task = _write_jsonl(tmp_path / "mc.jsonl", [{"query": "the cat", "choices": ["runs", "red"],
                                                 "gold": 0}])
    assert eval_main(["--model", str(export), "--export", "--backend", "hf", "--dtype",
                      "float32", "--local-task", f"mc={task}", "--out",
                      str(tmp_path / "report")]) == 0
    (record,) = json.loads((tmp_path / "report.json").read_text())["records"]
    assert record["numerics"] == "HF dequantised fp32" and record["tasks"]["mc"]["n"] == 1


EXPORT_FORMATS = ("int4", "fp8", "mxfp4", "nvfp4")


def _export_job(model_dir: str, out_root: str) -> dict:
    """Per format: the student's weight-only log-likelihoods (megatron fake quant) and lm-eval's
    HFLM on the dequantised export of it (export_student, fp32), plus the unquantized model's."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoTokenizer

    from nemo_opd.eval import MegatronLM, dequantize_export, hf_lm
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.export import export_student
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.runtime import distributed_runtime

    requests = _instances("loglikelihood", LOGLIK_REQUESTS)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand_as(ids)
    out = {}
    with distributed_runtime():
        tok = AutoTokenizer.from_pretrained(model_dir)
        out["unquantized"] = [lp for lp, _ in MegatronLM(load_hf_gpt(model_dir), tok)
                              .loglikelihood(requests)]
        for fmt in EXPORT_FORMATS:
            student = quantize_student(load_hf_gpt(model_dir), fmt,
                                       lambda m: m(ids, positions, attention_mask=None))
            export_student(student, model_dir, f"{out_root}/{fmt}", dtype=torch.float32,
                           tokenizer_dir=model_dir)
            with_activations = MegatronLM(student, tok).numerics
            # The dequantised checkpoint carries the weight codes; activations run unquantized.
            mtq.disable_quantizer(student, "*input_quantizer")
            plain = dequantize_export(f"{out_root}/{fmt}", f"{out_root}/{fmt}_plain",
                                      dtype=torch.float32)
            hf = hf_lm(plain, dtype="float32", batch_size=3, numerics="HF dequantised fp32")
            lm = MegatronLM(student, tok)
            out[fmt] = {"megatron": [lp for lp, _ in lm.loglikelihood(requests)],
                        "hf": [lp for lp, _ in hf.loglikelihood(requests)],
                        "numerics": (with_activations, lm.numerics, hf.numerics)}
    return out


@pytest.mark.multirank
def test_dequantised_export_scores_as_the_fake_quant_student(tiny_quant_model_dir, tmp_path):
    """export_student's checkpoint, dequantised and run by lm-eval's HFLM, gives the student's
    own (megatron fake-quant, weight-only) log-likelihoods, for every exported format."""
    (result,) = run_ranks(_export_job, world_size=1, timeout=600,
                          model_dir=tiny_quant_model_dir, out_root=str(tmp_path))
    for fmt in EXPORT_FORMATS:
        with_activations, weights_only, hf = result[fmt]["numerics"]
        assert weights_only == f"megatron fake-quant {fmt} fp32" and hf == "HF dequantised fp32"
        assert with_activations in (weights_only, f"megatron fake-quant {fmt} w+a fp32")
        for megatron, hf in zip(result[fmt]["megatron"], result[fmt]["hf"], strict=True):
            assert abs(megatron - hf) < LOGLIK_TOL, (fmt, megatron, hf)
        # Quantization moved the scores, so agreeing is not a coincidence of no-ops.
        assert max(abs(m - b) for m, b in zip(result[fmt]["megatron"], result["unquantized"],
                                              strict=True)) > 1e-3, fmt


def test_trtllm_backend_says_what_is_missing(tmp_path, capsys):
    import importlib.util

    from nemo_opd.eval.cli import main as eval_main

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed here: the GPU container tests cover it")
    task = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    code = eval_main(["--model", str(tmp_path), "--export", "--backend", "trtllm",
                      "--local-task", f"x={task}", "--out", str(tmp_path / "r")])
    assert code == 2 and "TensorRT-LLM is not installed" in capsys.readouterr().err


# ------------------------------------------------------------------ bad task input


def test_unknown_task_suggests_close_names():
    from nemo_opd.eval.tasks import LocalTask, resolve_tasks

    with pytest.raises(ValueError, match=r"unknown task 'hellaswg'; did you mean 'hellaswag'"):
        resolve_tasks(["hellaswg"])
    local = {"arith_mc": LocalTask("arith_mc", Path("never_read.jsonl"), "multiple_choice")}
    with pytest.raises(ValueError, match=r"unknown task 'arith_mcq'; did you mean 'arith_mc'"):
        resolve_tasks(["arith_mcq"], local)


def test_missing_local_data_names_the_file(tmp_path):
    from nemo_opd.eval.tasks import LocalTask, resolve_tasks

    missing = tmp_path / "nowhere" / "mc.jsonl"
    with pytest.raises(FileNotFoundError, match=f"local task data {missing} does not exist"):
        resolve_tasks([], {"mc": missing})
    with pytest.raises(FileNotFoundError, match=f"local task data {missing} does not exist"):
        resolve_tasks([], {"mc": LocalTask("mc", missing, "multiple_choice")})
    hub_file = tmp_path / "Rowan" / "hellaswag" / "default" / "validation.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"task 'hellaswag': missing local data "
                                                rf"{hub_file}"):
        resolve_tasks(["seed"], data_dir=tmp_path)


def test_unreachable_benchmark_data_says_how_to_go_offline(tmp_path):
    """The eval command, hub switched off: a clear error before any model is loaded."""
    import os
    import subprocess
    import sys

    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(tmp_path / "empty_cache")}
    done = subprocess.run([sys.executable, "-m", "nemo_opd", "eval", "--model",
                           str(tmp_path / "no_model"), "--tasks", "arc_easy", "--out",
                           str(tmp_path / "r")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert ("task 'arc_easy': its dataset is neither reachable on the Hugging Face hub nor in "
            "the local datasets cache") in done.stderr
    assert "--data-dir" in done.stderr


def test_malformed_local_records_name_file_and_line(tmp_path):
    from nemo_opd.eval.tasks import resolve_tasks

    path = _write_jsonl(tmp_path / "mc.jsonl", [
        {"query": "q", "choices": ["a", "b"], "gold": 1},
        {"query": "q", "choices": ["a", "b"], "gold": 2},
    ])
    with pytest.raises(ValueError, match=rf"{path}:2: 'gold' = 2 is not an index"):
        resolve_tasks([], {"mc": path})
    path = _write_jsonl(tmp_path / "gen.jsonl", [{"question": "q", "answer": 3}])
    with pytest.raises(ValueError, match=rf"{path}:1: field 'answer' must be str"):
        resolve_tasks([], {"gen": path})


def test_task_sets_expand_and_benchmark_groups_resolve_offline(tmp_path):
    from nemo_opd.eval.tasks import resolve_tasks

    folder = tmp_path / "cais" / "mmlu" / "abstract_algebra"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"mmlu_anatomy': missing local data .*"
                                                r"cais/mmlu/anatomy/test.jsonl"):
        resolve_tasks(["mmlu"], data_dir=tmp_path)
    (mmlu,) = resolve_tasks(["mmlu"])
    assert len(mmlu.leaves) == 57 and mmlu.metric == "acc,none" and mmlu.specs == ("mmlu",)
    names = [t.name for t in resolve_tasks(["seed", "gsm8k", "hellaswag"])]
    assert names == ["hellaswag", "arc_easy", "arc_challenge", "winogrande", "mmlu", "gsm8k"]
