"""Benchmark rollout generation: the megatron engine vs Hugging Face ``generate``, same weights.

    OMP_NUM_THREADS=1 python bench/bench_rollout.py                       # defaults below
    OMP_NUM_THREADS=1 python bench/bench_rollout.py --batch 4 --new-tokens 32 --repeats 2

One process (a world of one, TP=1). A random tiny Llama (``nemo_opd.models.tiny``, sizes from
the flags) is written as an HF checkpoint; the same directory is loaded by HF transformers and
by :func:`nemo_opd.models.load_hf_gpt` into a megatron-core ``GPTModel`` (twice more, quantized
to ``--format``). Every method generates ``--batch`` prompts of ``--prompt-len`` random ids,
exactly ``--new-tokens`` new tokens each (``min_new_tokens = max_new_tokens``, so no row stops
early and all methods do the same work), after one warm-up call. The methods are interleaved
round-robin, ``--repeats`` rounds, the order rotating every round, so load on a shared machine
lands on all of them; min and median wall time are reported, as rollout tokens/s (new tokens /
median s) and as ratios of the medians to HF ``generate`` and to the fp32 megatron engine.

Methods:

* ``hf_generate``: ``AutoModelForCausalLM.generate(use_cache=True)``;
* ``megatron_engine``: :class:`~nemo_opd.rollout.MegatronEngine` (megatron's static KV cache,
  its modules in their decoding forms, :mod:`nemo_opd.rollout.decode_layers`);
* ``megatron_modules_as_is``: the same engine running megatron-core's modules as they are
  (``decoding_layers=False``: keys re-rotated every step, matmuls in autograd ``Function``\ s);
* ``hf_engine``: :class:`~nemo_opd.rollout.HFEngine` refit from the fp32 student (the external
  engine that runs here: HF's model, the megatron engine's decoding loop and sampler);
* ``megatron_no_cache``: the same engine recomputing the whole sequence every step;
* ``megatron_<format>``: the engine on the fake-quant student (weights quantized once per call);
* ``megatron_<format>_per_token``: the same with ModelOpt's quantizers run in every forward
  (what the engine did before quantize-once);

each once greedy and once sampling (temperature 1, top-k 50, top-p 0.9). The ``match`` column
says whether greedy tokens equal HF's (fp32 methods) or the per-token quantized engine's. A last
line gives the HF engine's refit (``update_weights``) time from the fake-quant student, the cost
it adds to every optimizer step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="prompts per call")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the model")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (timed calls per method)")
    parser.add_argument("--format", default="mxfp4", help="quantized student's format")
    return parser.parse_args()


def _interleaved(calls: dict, repeats: int) -> dict[str, tuple[float, float, object]]:
    """``{name: (min s, median s, last result)}``: one warm-up call each, then ``repeats``
    rounds calling every method once, the order rotated by one every round."""
    results = {name: call() for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            started = time.perf_counter()
            results[name] = calls[name]()
            times[name].append(time.perf_counter() - started)
    return {name: (min(times[name]), statistics.median(times[name]), results[name])
            for name in calls}


def main() -> None:
    args = _parse()
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.models.tiny import TinyModelSpec, make_tiny_hf_model
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.rollout import HFEngine, MegatronEngine, SamplingParams
    from nemo_opd.runtime import distributed_runtime

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    spec = TinyModelSpec(hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 64,
                         max_position_embeddings=args.prompt_len + args.new_tokens + 1)
    with tempfile.TemporaryDirectory() as tmp, distributed_runtime():
        model_dir = make_tiny_hf_model(os.path.join(tmp, "llama"), "llama", spec, seed=0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        gpt = load_hf_gpt(model_dir)
        quantized = load_hf_gpt(model_dir)
        quantize_student(quantized, args.format)
        config = hf.config
        prompts = torch.randint(0, config.vocab_size - 1, (args.batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(0))
        eos, pad = config.eos_token_id, config.pad_token_id
        engines = {"megatron_engine": MegatronEngine(gpt, pad_id=pad, eos_id=eos),
                   "megatron_modules_as_is": MegatronEngine(gpt, pad_id=pad, eos_id=eos,
                                                            decoding_layers=False),
                   "megatron_no_cache": MegatronEngine(gpt, pad_id=pad, eos_id=eos,
                                                       use_kv_cache=False),
                   "hf_engine": HFEngine(gpt, model_dir, pad_id=pad, eos_id=eos),
                   f"megatron_{args.format}": MegatronEngine(quantized, pad_id=pad, eos_id=eos)}
        modes = {"greedy": dict(temperature=0.0),
                 "sampled": dict(temperature=1.0, top_k=50, top_p=0.9, seed=0)}
        rows = []
        for mode, sampling in modes.items():
            params = SamplingParams(max_new_tokens=args.new_tokens,
                                    min_new_tokens=args.new_tokens, **sampling)
            hf_kwargs = dict(do_sample=not params.greedy, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=pad,
                             use_cache=True,
                             attention_mask=torch.ones_like(prompts, device=device))
            if not params.greedy:
                hf_kwargs.update(temperature=params.temperature, top_k=params.top_k,
                                 top_p=params.top_p)

            def hf_call(kwargs=hf_kwargs):
                with torch.no_grad():
                    return hf.generate(prompts.to(device), **kwargs)[:, args.prompt_len:].cpu()

            def engine_call(engine, params=params):
                return engine.generate(prompts.tolist(), params).tokens[:, args.prompt_len:].cpu()

            def per_token_call(engine=engines[f"megatron_{args.format}"], params=params):
                with _quantizers_every_forward():
                    return engine_call(engine, params)

            calls = {"hf_generate": hf_call,
                     **{name: functools.partial(engine_call, engine)
                        for name, engine in engines.items()},
                     f"megatron_{args.format}_per_token": per_token_call}
            timed = _interleaved(calls, args.repeats)
            hf_median, fp32_median = timed["hf_generate"][1], timed["megatron_engine"][1]
            for name, (fastest, median, tokens) in timed.items():
                assert tokens.shape == (args.batch, args.new_tokens), (name, tokens.shape)
                reference = (timed[f"megatron_{args.format}_per_token"][2]
                             if args.format in name else timed["hf_generate"][2])
                match = (torch.equal(tokens, reference)
                         if mode == "greedy" and name not in ("hf_generate",
                                                              f"megatron_{args.format}_per_token")
                         else None)
                rows.append((mode, name, fastest, median,
                             args.batch * args.new_tokens / median, hf_median / median,
                             fp32_median / median, match))
        refit = HFEngine(quantized, model_dir, pad_id=pad, eos_id=eos)
        refit_times = []
        for _ in range(max(args.repeats, 3)):
            started = time.perf_counter()
            refit.update_weights(quantized)
            refit_times.append(time.perf_counter() - started)

    print(f"\nrollout generation, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    print(f"model: llama hidden {args.hidden}, {args.layers} layers, vocab {config.vocab_size}; "
          f"batch {args.batch} x (prompt {args.prompt_len} + {args.new_tokens} new tokens); "
          f"{args.repeats} interleaved rounds\n")
    print("| mode | method | min (s) | median (s) | tokens/s | vs HF | vs fp32 engine "
          "| greedy tokens match |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for mode, name, fastest, median, rate, vs_hf, vs_fp32, match in rows:
        same = "" if match is None else ("yes" if match else "no")
        print(f"| {mode} | `{name}` | {fastest:.3f} | {median:.3f} | {rate:.1f} | {vs_hf:.2f}x "
              f"| {vs_fp32:.2f}x | {same} |")
    print(f"\nHF engine refit from the {args.format} student (update_weights): min "
          f"{min(refit_times) * 1e3:.1f} ms, median {statistics.median(refit_times) * 1e3:.1f} ms")


@contextlib.contextmanager
def _quantizers_every_forward():
    """The engine without quantize-once: ModelOpt's weight quantizers run in every forward."""
    import nemo_opd.rollout.megatron_engine as megatron_engine

    real = megatron_engine.weights_quantized_once
    megatron_engine.weights_quantized_once = lambda model: contextlib.nullcontext(0)
    try:
        yield
    finally:
        megatron_engine.weights_quantized_once = real


if __name__ == "__main__":
    main()
