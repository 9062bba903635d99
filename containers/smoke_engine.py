"""Smoke-test an external rollout engine against the colocated megatron engine, with a refit.

    python containers/smoke_engine.py --engine trtllm   # inside containers/Dockerfile.trtllm, 1 GPU
    python containers/smoke_engine.py --engine vllm     # inside a vLLM container, 1 GPU
    python containers/smoke_engine.py --engine hf       # anywhere (CPU): checks this script

What it does, on a tiny Qwen3-style model written to a temporary directory (no hub):

1. load it as a megatron-core student and fake-quantize it (``--format``, MXFP4 by default);
2. build the engine the way the trainer does (:func:`nemo_opd.rollout.make_engine`, then
   :func:`nemo_opd.rollout.check_engine`), which refits it with the student's dequantised weights;
3. greedy rollouts from both engines: the fraction of equal tokens and the largest gap between the
   engine's raw log-probs and the megatron engine's (over each row's tokens up to the first
   disagreement: after it the contexts differ);
4. perturb the student's weights in place: the engine's rollouts must not change until
   ``update_weights``; after it they must agree with the megatron engine again, while the stale
   engine's did not.

Prints one line per check and a final PASS/FAIL; exit status 1 on failure. The thresholds allow
for an engine running in bf16 next to an fp32 trainer (``--dtype``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ENGINES = ("trtllm", "vllm", "hf")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES, required=True,
                        help="the engine under test (rollout.engine)")
    parser.add_argument("--format", default="mxfp4",
                        help="the student's quantization format (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the engine's weight dtype (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="largest allowed |engine - megatron| raw log-prob gap on tokens "
                             "both engines chose (default: %(default)s, bf16-sized)")
    parser.add_argument("--min-agreement", type=float, default=0.5,
                        help="least fraction of greedy tokens equal to the megatron engine's "
                             "(default: %(default)s: a random tiny model has near-ties that bf16 "
                             "breaks either way; ~1.0 with --dtype float32)")
    return parser.parse_args()


def _engine_options(engine: str, dtype: str) -> dict:
    if engine == "hf":
        return {"dtype": getattr(torch, dtype)}
    return {"dtype": dtype, "logprob_kind": "raw"}


def _compare(ours, reference) -> tuple[float, float]:
    """(fraction of equal response tokens, max log-prob gap over tokens up to the first
    disagreement of each row) — after a disagreement the contexts differ."""
    width = min(ours.tokens.shape[1], reference.tokens.shape[1])
    same = (ours.tokens[:, :width] == reference.tokens[:, :width]) & reference.loss_mask[:, :width]
    agree = same | ~reference.loss_mask[:, :width]
    prefix = agree.long().cumprod(dim=1).bool() & reference.loss_mask[:, :width]
    gap = (ours.logprobs[:, :width] - reference.logprobs[:, :width]).abs()[prefix]
    total = int(reference.loss_mask.sum())
    return float(same.sum()) / max(total, 1), float(gap.max()) if gap.numel() else 0.0


def main() -> int:
    args = _parse()
    from nemo_opd.config import DataConfig, ModelConfig, RolloutConfig, RunConfig
    from nemo_opd.console import configure_console
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.models.tiny import make_tiny_hf_model, make_tiny_tokenizer
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.rollout import MegatronEngine, SamplingParams, check_engine, make_engine
    from nemo_opd.rollout.factory import check_rollout_setup
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    configure_console()
    failures: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    with tempfile.TemporaryDirectory() as root:
        tokenizer = make_tiny_tokenizer()
        model_dir = str(make_tiny_hf_model(Path(root) / "student", "qwen3", tokenizer=tokenizer))
        data = Path(root) / "train.jsonl"
        data.write_text('{"prompt": "a", "response": "b"}\n')
        cfg = RunConfig(model=ModelConfig(student=model_dir, teacher=model_dir),
                        data=DataConfig(train_files=(str(data),)),
                        rollout=RolloutConfig(engine=args.engine))
        check_rollout_setup(cfg)
        with distributed_runtime(ParallelConfig(1)):
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_hf_gpt(model_dir, ParallelConfig(1)).to(device)
            quantize_student(model, args.format)
            ids = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
            engine = make_engine(cfg, model, None, **ids, **_engine_options(args.engine,
                                                                            args.dtype))
            check_engine(engine, model, tokenizer, cfg)
            print(f"built {type(engine).__name__} ({args.engine}, {args.dtype}) for a "
                  f"{args.format} student on {device}", flush=True)
            megatron = MegatronEngine(model, **ids)
            prompts = [tokenizer(t)["input_ids"] for t in
                       ("the cat sat on", "one two three four", "a b c", "hello world")]
            params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)

            same, gap = _compare(engine.generate(prompts, params),
                                 megatron.generate(prompts, params))
            check("greedy tokens", same >= args.min_agreement,
                  f"{same:.1%} equal to the megatron engine's")
            check("raw log-probs", gap <= args.tolerance, f"max gap {gap:.2e}")

            before = engine.generate(prompts, params)
            with torch.no_grad():
                model.output_layer.weight.mul_(1.5)
                linear = model.decoder.layers[0].mlp.linear_fc2
                linear.weight.add_(0.2 * torch.randn_like(linear.weight))
            stale = engine.generate(prompts, params)
            check("no refit without update_weights",
                  torch.equal(stale.tokens, before.tokens)
                  and torch.allclose(stale.logprobs, before.logprobs),
                  "rollouts unchanged after the student's weights moved")
            moved = megatron.generate(prompts, params)
            stale_gap = _compare(stale, moved)[1]
            engine.update_weights(model)
            same, gap = _compare(engine.generate(prompts, params), moved)
            check("refit tokens", same >= args.min_agreement,
                  f"{same:.1%} equal after update_weights")
            check("refit log-probs", gap <= args.tolerance and gap < stale_gap / 4,
                  f"max gap {gap:.2e} (before update_weights: {stale_gap:.2e})")
    print("FAIL: " + ", ".join(failures) if failures else "PASS", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
