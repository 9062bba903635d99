"""Benchmark the distillation losses: time and peak extra memory of forward + backward.

    OMP_NUM_THREADS=1 python bench/bench_loss.py              # 2,048 tokens, ~3 minutes
    OMP_NUM_THREADS=1 python bench/bench_loss.py --tokens 256 # quick
    python bench/bench_loss.py --device cuda --tokens 8192    # on a GPU

On CPU every method runs in its own fresh subprocess (one torch thread): the inputs are built
there in small pieces (no full-size temporaries), then the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``) and one forward + backward is measured. "Extra peak" is the peak
resident memory above the resident memory right after the inputs were built, so it includes
everything the method allocates: its temporaries and the gradient it returns. It is reported in
GiB and in units of one bf16 ``[tokens, V]`` logits tensor. A small warm-up call (8 tokens)
runs first so lazy initialisation is not timed.

On CUDA (``--device cuda``) the same subprocess-per-method scheme is used; inputs are built on the
host and copied to the GPU, one full-size call warms up (allocator, kernels), then the median of
``--repeats`` synchronised calls is reported, and "extra peak" is
``torch.cuda.max_memory_allocated()`` above the allocation right after the inputs were built.

Methods (``V`` = 151,936, the Qwen3 vocabulary; bf16 logits; β = 0 unless named):

* ``modelopt``: ModelOpt's ``LogitsKLLoss`` (megatron plugin, forward KL), mean over tokens;
* ``naive``: full-vocab torch: ``log_softmax`` of both in float32, ``kl_div``, mean;
* ``ours_beta0`` / ``ours_beta0.5`` / ``ours_beta1``: :func:`nemo_opd.loss.generalized_jsd`;
* ``ours_topk1024``: :func:`~nemo_opd.loss.teacher_topk` (k = 1024) + the top-k loss;
* ``ours_sampled``: :func:`~nemo_opd.loss.sampled_token_reverse_kl`;
* ``unfused_pipeline``: hidden states ``[tokens, H]`` → both output layers (``H`` = 1,024) →
  ``generalized_jsd`` → gradients of student hidden states and output weight;
* ``fused_pipeline``: the same through :func:`~nemo_opd.loss.fused_generalized_jsd`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

METHODS = ("modelopt", "naive", "ours_beta0", "ours_beta0.5", "ours_beta1", "ours_topk1024",
           "ours_sampled", "unfused_pipeline", "fused_pipeline")
PIPELINES = ("unfused_pipeline", "fused_pipeline")


def _rss_kib() -> tuple[int, int]:
    """(current RSS, peak RSS) in KiB from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _random(shape, seed, scale, dtype, like=None):
    """A bf16 tensor filled 16 rows at a time, so no float32 full-size temporary exists."""
    import torch

    out = torch.empty(*shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, shape[0], 16):
        rows = torch.randn(min(16, shape[0] - start), *shape[1:], generator=gen) * scale
        if like is not None:
            rows += like[start:start + 16].float()
        out[start:start + 16] = rows
    return out


def _build(method: str, tokens: int, vocab: int, hidden: int, device: str = "cpu"):
    """Inputs and a ``run(n_tokens)`` closure doing forward + backward on the first n tokens."""
    import torch
    import torch.nn.functional as F

    import nemo_opd.loss as L

    dtype = torch.bfloat16
    if method in PIPELINES:
        h_s = _random((tokens, hidden), 1, 1.0, dtype)
        h_t = _random((tokens, hidden), 2, 1.0, dtype, like=h_s)
        w_s = _random((vocab, hidden), 3, 2.0 / hidden**0.5, dtype)
        w_t = _random((vocab, hidden), 4, 0.5 / hidden**0.5, dtype, like=w_s)
        h_s, h_t, w_s, w_t = (t.to(device) for t in (h_s, h_t, w_s, w_t))

        def run(n):
            h, w = h_s[:n].detach().requires_grad_(), w_s.detach().requires_grad_()
            if method == "fused_pipeline":
                loss = L.fused_generalized_jsd(h, w, h_t[:n], w_t, beta=0.0)
            else:
                loss = L.generalized_jsd(h @ w.t(), h_t[:n] @ w_t.t(), beta=0.0)
            loss.backward()
            return loss.item()

        return run

    student = _random((tokens, vocab), 1, 2.0, dtype)
    teacher = _random((tokens, vocab), 2, 1.0, dtype, like=student)
    student, teacher = student.to(device), teacher.to(device)

    if method == "modelopt":
        import types

        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

        criterion = LogitsKLLoss(types.SimpleNamespace(tensor_model_parallel_size=1,
                                                       sequence_parallel=False))

        def loss_fn(s, t):
            return criterion(s.unsqueeze(1), t.unsqueeze(1))[0].mean()  # [s, b=1, V]
    elif method == "naive":
        def loss_fn(s, t):
            ls, lt = F.log_softmax(s.float(), dim=-1), F.log_softmax(t.float(), dim=-1)
            return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1).mean()
    elif method.startswith("ours_beta"):
        beta = float(method.removeprefix("ours_beta"))

        def loss_fn(s, t):
            return L.generalized_jsd(s, t, beta=beta)
    elif method == "ours_topk1024":
        def loss_fn(s, t):
            return L.topk_generalized_jsd(s, L.teacher_topk(t, 1024), beta=0.0)
    elif method == "ours_sampled":
        tokens_ids = torch.randint(0, vocab, (tokens,),
                                   generator=torch.Generator().manual_seed(5)).to(device)

        def loss_fn(s, t):
            ids = tokens_ids[:s.shape[0]]
            teacher_logp = L.vocab_parallel_logprobs(t, ids)
            return L.sampled_token_reverse_kl(s, ids, teacher_logp, None).loss
    else:
        raise ValueError(f"unknown method {method!r}")

    def run(n):
        x = student[:n].detach().requires_grad_()
        loss = loss_fn(x, teacher[:n])
        loss.backward()
        return loss.item()

    return run


def worker(method: str, tokens: int, vocab: int, hidden: int, device: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    run = _build(method, tokens, vocab, hidden, device)
    if device == "cuda":
        return {"method": method, **_measure_cuda(run, tokens, repeats)}
    run(8)  # warm-up: lazy initialisation, small
    gc.collect()
    base_rss, _ = _rss_kib()
    _reset_peak()
    start = time.perf_counter()
    loss = run(tokens)
    seconds = time.perf_counter() - start
    _, peak = _rss_kib()
    return {"method": method, "seconds": seconds, "extra_gib": (peak - base_rss) / 2**20,
            "loss": loss}


def _measure_cuda(run, tokens: int, repeats: int) -> dict:
    """Median wall time of ``repeats`` synchronised calls after a full-size warm-up; peak
    allocation above what the inputs hold."""
    import statistics

    import torch

    run(tokens)  # warm-up at full size: kernels, allocator pools
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = run(tokens)  # .item() inside synchronises
        times.append(time.perf_counter() - start)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"seconds": statistics.median(times), "extra_gib": extra, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the pipelines")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (CUDA)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.vocab, args.hidden, args.device,
                                args.repeats)))
        return

    env = dict(os.environ, OMP_NUM_THREADS="1")
    logits_gib = args.tokens * args.vocab * 2 / 2**30
    results = []
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--worker", method, "--tokens",
                              str(args.tokens), "--vocab", str(args.vocab), "--hidden",
                              str(args.hidden), "--device", args.device, "--repeats",
                              str(args.repeats)], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{method} failed:\n{out.stderr}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"  {method}: {result['seconds']:.2f} s, {result['extra_gib']:.3f} GiB",
              file=sys.stderr, flush=True)

    reference = next((r["seconds"] for r in results if r["method"] == "modelopt"), None)
    import torch

    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.processor() or platform.machine()}, 1 thread")
    print(f"tokens={args.tokens} V={args.vocab} hidden={args.hidden} bf16; one logits tensor "
          f"[tokens, V] = {logits_gib:.3f} GiB; torch {torch.__version__}, {where}\n")
    print("| method | time (s) | time / ModelOpt | extra peak (GiB) | extra peak / logits | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r['seconds'] / reference:.3f}" if reference else "–"
        print(f"| `{r['method']}` | {r['seconds']:.2f} | {ratio} | {r['extra_gib']:.3f} | "
              f"{r['extra_gib'] / logits_gib:.2f}× | {r['loss']:.5f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": args.device, "tokens": args.tokens, "vocab": args.vocab,
                       "hidden": args.hidden, "logits_gib": logits_gib, "results": results},
                      handle, indent=1)


if __name__ == "__main__":
    main()
