"""lm-eval's own command line with ``--model nemo_opd`` against ``nemo_opd eval``; the default
dtype (the checkpoint's); ``--help`` without megatron or ModelOpt.

The model runs are subprocesses (lm-eval's CLI reads ``sys.argv`` and both bring up a process
runtime), on a tiny Llama and two local tasks: one multiple choice, one generative.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("megatron.core", "modelopt", "torch")

# Runs an entry point in-process and prints which heavy modules it imported.
_PROBE = """
import runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as exit_:
    code = exit_.code
else:
    code = 0
print("PROBE", code, ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.parametrize("argv", [
    ["nemo_opd", "--help"],
    ["nemo_opd", "eval", "--help"],
    ["nemo_opd", "eval", "compare", "--help"],
    ["nemo_opd", "lm_eval", "--help"],
])
def test_help_imports_no_megatron_modelopt_or_torch(argv):
    done = _run(["-c", _PROBE.format(argv=argv, module="nemo_opd", heavy=HEAVY)])
    line = done.stdout.strip().splitlines()[-1].split(" ", 2)
    assert line[:2] == ["PROBE", "0"], done.stdout[-2000:]
    assert (line[2] if len(line) > 2 else "") == "", f"{argv} imported {line[2]}"
    assert "usage" in done.stdout.lower()
    assert "warn" not in done.stderr.lower(), done.stderr


def test_registry_keeps_lm_evals_own_models():
    """The lazy ``nemo_opd`` entry does not hide lm-eval's models (its get_model fills the
    registry only while it is empty) and imports nothing heavy."""
    code = ("import sys\n"
            "from nemo_opd.eval.lm_eval_cli import register\n"
            "register(); register()\n"
            "from lm_eval.api.registry import model_registry\n"
            "print('hf' in model_registry, 'nemo_opd' in model_registry,\n"
            f"      [m for m in {HEAVY!r} if m in sys.modules])\n")
    assert _run(["-c", code]).stdout.split() == ["True", "True", "[]"]


# ------------------------------------------------------------------ the default dtype


def _write_checkpoint(folder: Path, config: dict, tensors: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_default_dtype_is_the_checkpoints(tmp_path):
    import torch

    from nemo_opd.eval.exported import checkpoint_dtype

    bf16 = {"embed.weight": torch.zeros(4, 8, dtype=torch.bfloat16)}
    assert checkpoint_dtype(_write_checkpoint(tmp_path / "a", {"dtype": "bfloat16"}, bf16)) \
        == "bfloat16"
    assert checkpoint_dtype(_write_checkpoint(tmp_path / "b", {"torch_dtype": "float16"}, bf16)) \
        == "float16"
    # No dtype in config.json: the stored tensors say it.
    assert checkpoint_dtype(_write_checkpoint(tmp_path / "c", {}, bf16)) == "bfloat16"
    # An export: its unquantized tensors' dtype, whatever config.json (the source's) says; the
    # packed weights and their scales do not count, however large.
    export = _write_checkpoint(tmp_path / "export", {"torch_dtype": "float32"}, {
        "model.embed_tokens.weight": torch.zeros(16, 8, dtype=torch.float16),
        "model.norm.weight": torch.ones(8, dtype=torch.float16),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64, dtype=torch.uint8),
        "model.layers.0.mlp.down_proj.weight_scale": torch.ones(64, 64, dtype=torch.float32),
    })
    (export / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8"}}')
    assert checkpoint_dtype(export) == "float16"
    with pytest.raises(ValueError, match="stores float64 weights"):
        checkpoint_dtype(_write_checkpoint(tmp_path / "d", {"dtype": "float64"}, bf16))


# ------------------------------------------------------------------ lm-eval CLI = nemo_opd eval


def _tasks(folder: Path) -> dict[str, Path]:
    """Eight multiple-choice records with seeded gold answers and four generative ones."""
    rng = random.Random(0)
    words = ["cat", "dog", "fish", "bird", "red", "blue"]
    mc = [{"query": f"question: the {rng.choice(words)} sees {i} {rng.choice(words)}? answer:",
           "choices": rng.sample(words, 3), "gold": rng.randrange(3)} for i in range(8)]
    gen = [{"question": f"the {w} sees", "answer": a}
           for w, a in zip(words[:4], ["the cat", "zz", "a dog", "fish"], strict=True)]
    folder.mkdir()
    files = {}
    for name, records in (("mc", mc), ("gen", gen)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


def test_lm_eval_cli_with_model_nemo_opd_equals_nemo_opd_eval(tiny_model_dirs, tmp_path):
    from nemo_opd.eval.tasks import LocalTask

    model = tiny_model_dirs["llama"]
    files = _tasks(tmp_path / "data")
    for name, path in files.items():
        LocalTask.from_file(name, path).write_yaml(tmp_path / "yaml")

    _run(["-m", "nemo_opd", "eval", "--model", model, "--local-task", f"mc={files['mc']}",
          "--local-task", f"gen={files['gen']}", "--batch-size", "4", "--out",
          str(tmp_path / "ours")])
    (record,) = json.loads((tmp_path / "ours.json").read_text())["records"]
    _run(["-m", "nemo_opd", "lm_eval", "--model", "nemo_opd", "--model_args",
          f"pretrained={model},tp=1,export=false,batch_size=4", "--tasks", "mc", "gen",
          "--include_path", str(tmp_path / "yaml"), "--output_path", str(tmp_path / "lm_eval")])
    (results_file,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())

    assert record["numerics"] == "megatron fp32"  # the checkpoint's dtype, not asked for
    for task, metric in (("mc", "acc"), ("gen", "exact_match")):
        ours, row = record["tasks"][task], theirs["results"][task]
        assert ours["metric"] == f"{metric},none"
        assert ours["value"] == row[f"{metric},none"], task
        assert ours["stderr"] == pytest.approx(row[f"{metric}_stderr,none"], rel=1e-12), task
        assert ours["n"] == theirs["n-samples"][task]["effective"]
    # Not a vacuous agreement: the task scores are neither all right nor all wrong.
    assert 0 < record["tasks"]["mc"]["value"] < 1
    assert theirs["config"]["model"] == "nemo_opd"
