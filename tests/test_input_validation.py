"""Bad input is refused before any model loads, with a message naming the problem (issue 15,
items 5-7): every case runs the recipe function itself (what `nemo run` calls) with the loader
of HF weights instrumented, so "no model was loaded" is observed, not assumed. Also the
bookkeeping around runs: metrics.jsonl after a resume, truncated prompts, the preemption
message when resuming is off, and `nemo_opd eval --export` on a directory that is no export.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from multirank import run_ranks

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "onpolicy_qat.py"


def _bad_inputs(cases: dict[str, list[str]]) -> dict[str, dict]:
    """Each case's overrides through the recipe's check and function; the error each raised
    and how many HF weight loads happened before it."""
    import importlib.util

    import nemo_opd.train.setup as setup
    from nemo_opd.launch.recipe import apply_overrides, built_arguments, resolve_preset

    spec = importlib.util.spec_from_file_location("onpolicy_qat_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    loads = []
    real_load = setup.load_hf_gpt
    setup.load_hf_gpt = lambda *a, **k: loads.append(a[0]) or real_load(*a, **k)
    out = {}
    for name, overrides in cases.items():
        loads.clear()
        task = resolve_preset(recipe.onpolicy_qat, None, recipe.tiny)
        try:
            apply_overrides(task, overrides)
            kwargs = built_arguments(task)
            recipe.check(kwargs, None)
            recipe.onpolicy_qat(**kwargs)
            out[name] = {"error": None, "loads": len(loads)}
        except Exception as err:  # noqa: BLE001 - the message is what is checked
            out[name] = {"error": f"{type(err).__name__}: {err}", "loads": len(loads)}
    return out


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.multirank
def test_bad_inputs_fail_before_any_model_loads(tiny_model_dirs, tiny_tokenizer, train_file,
                                                tmp_path):
    from nemo_opd.models.tiny import make_tiny_hf_model, make_tiny_tokenizer

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dirs["qwen3"], gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (gpt2 / "config.json").write_text(json.dumps(config))
    other_tokenizer = make_tiny_hf_model(tmp_path / "other_tok", "qwen3", seed=4,
                                         tokenizer=make_tiny_tokenizer(seed=5))
    base = [f"model.student={tiny_model_dirs['llama']}",
            f"model.teacher={tiny_model_dirs['qwen3']}", f"data.train_files=[{train_file}]",
            f"demo_dir={tmp_path / 'unused_demo'}", "evaluation.tasks=[]", "optim.steps=4"]
    good_line = json.dumps({"prompt": "a", "response": "b"}) + "\n"
    data = {"empty": "", "blank": "\n\n\n", "bad": good_line + '{"prompt": oops}\n'}
    files = {name: _write(tmp_path / f"{name}.jsonl", text) for name, text in data.items()}
    cases = {
        "architecture": [f"model.teacher={gpt2}"],
        "tokenizer": [f"model.teacher={other_tokenizer}"],
        "output_is_a_file": [f"output_dir={_write(tmp_path / 'a_file', 'x')}"],
        "empty_data": [f"data.train_files=[{files['empty']}]"],
        "blank_data": [f"data.train_files=[{files['blank']}]"],
        "malformed_jsonl": [f"data.train_files=[{files['bad']}]"],
    }
    out_dir = f"output_dir={tmp_path / 'run'}"
    (results,) = run_ranks(_bad_inputs, world_size=1, timeout=600, cases={
        name: [*base, out_dir, *overrides] for name, overrides in cases.items()})

    expected = {
        "architecture": r"unsupported architecture 'GPT2LMHeadModel'",
        "tokenizer": r"vocabularies disagree .* tokenize differently",
        "output_is_a_file": r"a_file is a file, not a directory",
        "empty_data": r"empty.jsonl is empty",
        "blank_data": r"blank.jsonl holds no records",
        "malformed_jsonl": r"bad.jsonl line 2 is not JSON",
    }

    for name, pattern in expected.items():
        result = results[name]
        assert result["error"] and re.search(pattern, result["error"]), (name, result)
        assert result["loads"] == 0, (name, result)


def test_read_only_output_dir_is_refused(tmp_path):
    from nemo_opd.launch.stages import check_output_dir

    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(ValueError, match=r"is not writable: .*ro: Read-only file system"):
            check_output_dir(target / "run")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    check_output_dir(target / "run")  # writable again; nothing was created
    assert not (target / "run").exists()


def test_metrics_jsonl_holds_each_step_once_after_a_resume(tmp_path):
    from nemo_opd.config import DataConfig, LoggingConfig, ModelConfig, RunConfig
    from nemo_opd.train.metrics import MetricsLogger

    cfg = RunConfig(model=ModelConfig(student="x"), data=DataConfig(train_files=("x.jsonl",)),
                    output_dir=str(tmp_path),
                    logging=LoggingConfig(progress_bar=False, tensorboard=False))
    first = MetricsLogger(cfg, rank=0, total_steps=6)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)})
    first.log_event(4, "eval", {"score": 0.5})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "los')  # torn by a kill -9
    resumed = MetricsLogger(cfg, rank=0, total_steps=6, start_step=4)  # checkpoint of step 4
    for step in (5, 6):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r.get("loss", r.get("event"))) for r in records] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (4, "eval"), (5, 50.0), (6, 60.0)]


def test_truncated_prompts_are_counted_once(tiny_tokenizer, tmp_path, caplog):
    from nemo_opd.config import DataConfig
    from nemo_opd.data.source import PromptEncoder, encode_records, load_records

    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": "one two three " * n, "response": "x"}) + "\n"
                            for n in (1, 20, 30)))
    cfg = DataConfig(train_files=(str(path),), max_prompt_length=8, chat_template=False)
    with caplog.at_level(logging.WARNING, logger="nemo_opd.data.source"):
        examples = encode_records(load_records(cfg), PromptEncoder(tiny_tokenizer, cfg))
    assert [len(e.prompt_ids) for e in examples][1:] == [8, 8]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "truncated 2 of 3 prompts" in warnings[0], warnings


def test_preemption_message_follows_checkpoint_resume(caplog):
    from nemo_opd.launch.stages import PREEMPTED_EXIT_CODE, exit_preempted

    for resume, says in ((True, "a requeue or rerun resumes from it"),
                         (False, "rerun with checkpoint.resume=true to continue")):
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as exit_:
            exit_preempted(3, resume=resume)
        assert exit_.value.code == PREEMPTED_EXIT_CODE and says in caplog.text


def test_eval_export_refuses_a_directory_that_is_not_an_export(tiny_model_dirs, tmp_path):
    from nemo_opd.eval.exported import dequantize_export

    with pytest.raises(ValueError, match=r"is not a quantized export \(no hf_quant_config.json\)"):
        dequantize_export(tiny_model_dirs["llama"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
