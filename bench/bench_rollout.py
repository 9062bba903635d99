"""Benchmark rollout generation: the megatron engine vs Hugging Face ``generate``, same weights.

    OMP_NUM_THREADS=1 python bench/bench_rollout.py                       # defaults below
    OMP_NUM_THREADS=1 python bench/bench_rollout.py --batch 4 --new-tokens 32 --repeats 2

One process (a world of one, TP=1). A random tiny Llama (``nemo_opd.models.tiny``, sizes from
the flags) is written as an HF checkpoint; the same directory is loaded by HF transformers and
by :func:`nemo_opd.models.load_hf_gpt` into a megatron-core ``GPTModel``. Every method generates
``--batch`` prompts of ``--prompt-len`` random ids, exactly ``--new-tokens`` new tokens each
(``min_new_tokens = max_new_tokens``, so no row stops early and all methods do the same work),
after one warm-up call; the median wall time of ``--repeats`` calls is reported as rollout
tokens/s (new tokens / s) and as a ratio to HF ``generate`` with its KV cache.

Methods:

* ``hf_generate``: ``AutoModelForCausalLM.generate(use_cache=True)``;
* ``megatron_engine``: :class:`~nemo_opd.rollout.MegatronEngine` (megatron's static KV cache);
* ``megatron_no_cache``: the same engine recomputing the whole sequence every step;

each once greedy and once sampling (temperature 1, top-k 50, top-p 0.9). The ``match`` column
says whether greedy tokens equal HF's.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method")
    return parser.parse_args()


def _median_seconds(call, repeats: int) -> tuple[float, object]:
    call()  # warm-up: lazy initialisation, allocator
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    args = _parse()
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.models.tiny import TinyModelSpec, make_tiny_hf_model
    from nemo_opd.rollout import MegatronEngine, SamplingParams
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
        config = hf.config
        prompts = torch.randint(0, config.vocab_size - 1, (args.batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(0))
        eos, pad = config.eos_token_id, config.pad_token_id
        engines = {"megatron_engine": MegatronEngine(gpt, pad_id=pad, eos_id=eos),
                   "megatron_no_cache": MegatronEngine(gpt, pad_id=pad, eos_id=eos,
                                                       use_kv_cache=False)}
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

            hf_seconds, hf_tokens = _median_seconds(hf_call, args.repeats)
            results = {"hf_generate": (hf_seconds, hf_tokens)}
            for name, engine in engines.items():
                seconds, batch = _median_seconds(
                    lambda engine=engine, params=params: engine.generate(prompts.tolist(),
                                                                         params), args.repeats)
                results[name] = (seconds, batch.tokens[:, args.prompt_len:].cpu())
            for name, (seconds, tokens) in results.items():
                new_tokens = args.batch * args.new_tokens
                assert tokens.shape == (args.batch, args.new_tokens), (name, tokens.shape)
                match = (torch.equal(tokens, hf_tokens) if mode == "greedy" and
                         name != "hf_generate" else None)
                rows.append((mode, name, seconds, new_tokens / seconds, hf_seconds / seconds,
                             match))

    print(f"\nrollout generation, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    print(f"model: llama hidden {args.hidden}, {args.layers} layers, vocab {config.vocab_size}; "
          f"batch {args.batch} x (prompt {args.prompt_len} + {args.new_tokens} new tokens); "
          f"median of {args.repeats}\n")
    print("| mode | method | time (s) | tokens/s | tokens/s vs HF | greedy tokens = HF |")
    print("|---|---|---:|---:|---:|---|")
    for mode, name, seconds, rate, ratio, match in rows:
        same = "" if match is None else ("yes" if match else "no")
        print(f"| {mode} | `{name}` | {seconds:.3f} | {rate:.1f} | {ratio:.2f}x | {same} |")


if __name__ == "__main__":
    main()
