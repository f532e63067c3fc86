"""Benchmark the OT fusion of lavcap_hf against a per-sample loop shaped like the official LAVCap code.

One step = normalisation, similarity, Sinkhorn (50 iterations), alignment losses and OT attention
(`ot_att`), forward and backward, at A=64 audio tokens, V=20 visual tokens, C=768 channels. The backward starts
from the alignment losses and from a fixed random gradient on the fused tokens, standing in for the one the
projector hands back in training, so that only the module's own work is timed.
The baseline keeps the official structure: plain autograd ops (division by the bare norm, einsum,
cat + add), batched except for Sinkhorn, which runs one sample at a time in a Python loop over the batch.
A second table times Sinkhorn alone (forward only), the part in which the two differ most.
Prints markdown tables. On a busy CPU, `--threads 1` gives steadier figures.

    python benchmarks/bench_ot.py [--device cpu|cuda] [--repeats 20] [--batch-sizes 1 4 32 128] [--threads N]

Peak memory, over one warm-up and one step, minus what inputs and module already hold: on CUDA
`torch.cuda.max_memory_allocated`; on CPU (Linux) the peak resident set `VmHWM` of /proc/self/status, in a
fresh subprocess per implementation and batch size (so earlier runs cannot mask it). Not
`getrusage().ru_maxrss`: it survives execve, so a child would start at its parent's peak; not tracemalloc:
it does not see torch's allocations.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from measure import (
    CLOCKS,
    add_clock_argument,
    check_clock,
    cpu_name,
    peak_rss_growth,
    reset_peak_rss,
    synchronize,
)
from measure import (
    peak_memory_mib as peak_memory_of_call,
)

from lavcap_hf.model.optimal_transport import LOGIT_SCALE_MAX, build_fusion, log_sinkhorn, normalize_features

NUM_AUDIO, NUM_VISUAL, HIDDEN = 64, 20, 768
EPSILON, ITERATIONS = 0.1, 50


def per_sample_log_sinkhorn(kernel: torch.Tensor, iterations: int) -> torch.Tensor:
    """Log-domain Sinkhorn on one (V, A) kernel with (V,) and (A,) potentials, as the official code does."""
    num_visual, num_audio = kernel.shape
    log_mu = kernel.new_full((num_visual,), -math.log(num_visual))
    log_nu = kernel.new_full((num_audio,), -math.log(num_audio))
    u, w = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iterations):
        u = log_mu - torch.logsumexp(kernel + w.unsqueeze(0), dim=1)
        w = log_nu - torch.logsumexp(kernel + u.unsqueeze(1), dim=0)
    return kernel + u.unsqueeze(1) + w.unsqueeze(0)


def looped_log_sinkhorn(similarity: torch.Tensor) -> torch.Tensor:
    """(B, V, A) log plan, one sample at a time, as the official code fills its plan tensor."""
    log_plan = torch.zeros_like(similarity)
    with torch.no_grad():
        for i in range(similarity.shape[0]):
            log_plan[i] = per_sample_log_sinkhorn(similarity[i].float() / EPSILON, ITERATIONS)
    return log_plan


def looped_ot_attention(audio: torch.Tensor, visual: torch.Tensor, logit_scale: torch.Tensor):
    """Official-structure `ot_att`: returns (fused (B, A+V, C), loss_v, loss_a, log_plan (B, V, A))."""
    dtype = audio.dtype
    audio, visual = audio.float(), visual.float()
    audio = audio / audio.norm(dim=-1, keepdim=True)  # the official normalisation (no eps)
    visual = visual / visual.norm(dim=-1, keepdim=True)
    similarity = torch.einsum("bvc,bac->bva", visual, audio)
    log_plan = looped_log_sinkhorn(similarity)
    with torch.no_grad():
        logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    logits_v = logit_scale * torch.einsum("bva,bua->bvu", log_plan, similarity)
    logits_a = logit_scale * torch.einsum("bva,bvc->bac", log_plan, similarity)
    targets_v = torch.arange(logits_v.shape[1], device=audio.device).expand(logits_v.shape[:2])
    targets_a = torch.arange(logits_a.shape[1], device=audio.device).expand(logits_a.shape[:2])
    loss_v, loss_a = F.cross_entropy(logits_v, targets_v), F.cross_entropy(logits_a, targets_a)
    plan = log_plan.exp()
    attended = torch.cat(
        [torch.einsum("bva,bvc->bac", plan, visual), torch.einsum("bva,bac->bvc", plan, audio)], dim=1
    )
    fused = torch.cat([audio, visual], dim=1) + attended
    return fused.to(dtype), loss_v, loss_a, log_plan


def make_step(impl: str, batch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Inputs and a closure running one forward + backward; the closure returns the outputs and grads."""
    generator = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch_size, NUM_AUDIO, HIDDEN, generator=generator).to(device, dtype).requires_grad_()
    visual = (
        torch.randn(batch_size, NUM_VISUAL, HIDDEN, generator=generator).to(device, dtype).requires_grad_()
    )
    fusion = build_fusion("ot_att", HIDDEN).to(device)
    fused_grad = torch.randn(batch_size, NUM_AUDIO + NUM_VISUAL, HIDDEN, generator=generator).to(
        device, dtype
    )

    def step():
        audio.grad = visual.grad = fusion.logit_scale.grad = None
        if impl == "batched":
            out = fusion(audio, visual, output_ot_plan=True)
            outputs = (out.fused, out.loss_v, out.loss_a, out.log_plan)
        else:
            outputs = looped_ot_attention(audio, visual, fusion.logit_scale)
        fused, loss_v, loss_a, _ = outputs
        torch.autograd.backward((loss_v + loss_a, fused), (None, fused_grad))
        return outputs + (audio.grad, visual.grad, fusion.logit_scale.grad)

    return step


def median_ms(batched, looped, device: torch.device, repeats: int, clock: str) -> tuple[float, float]:
    """Median time (ms) of two callables on `clock`, run alternately so that load changes hit both alike."""
    batched(), looped()  # warm-up
    now = CLOCKS[clock]
    times = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((batched, looped), times, strict=True):
            synchronize(device)
            start = now()
            fn()
            synchronize(device)
            bucket.append(now() - start)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def peak_memory_mib(
    impl: str, batch_size: int, device: torch.device, dtype: torch.dtype, threads: int | None
) -> float:
    """Peak memory growth (MiB) over one warm-up and one step, beyond the inputs and the module."""
    if device.type == "cuda":
        step = make_step(impl, batch_size, device, dtype)
        return peak_memory_of_call(lambda: (step(), step()), device)[1]
    probe = [sys.executable, __file__, "--rss-probe", impl, str(batch_size), "--dtype", str(dtype)[6:]]
    return float(subprocess.run(probe, check=True, capture_output=True, text=True).stdout)


def rss_probe(impl: str, batch_size: int, dtype: torch.dtype) -> None:
    """Print the peak RSS growth (MiB) over one warm-up and one step, in this fresh process."""
    step = make_step(impl, batch_size, torch.device("cpu"), dtype)
    baseline = reset_peak_rss()
    step()
    step()
    print(peak_rss_growth(baseline))


def max_abs_difference(batch_size: int, device: torch.device, dtype: torch.dtype) -> float:
    batched = make_step("batched", batch_size, device, dtype)()
    looped = make_step("looped", batch_size, device, dtype)()
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(batched, looped, strict=True))


def print_step_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    print(
        "| batch | batched (ms) | per-sample loop (ms) | speed-up | max abs diff | peak MiB batched | peak MiB loop |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        steps = (make_step(impl, batch_size, device, dtype) for impl in ("batched", "looped"))
        batched, looped = median_ms(*steps, device, args.repeats, args.clock)
        difference = max_abs_difference(batch_size, device, dtype)
        memory = [
            peak_memory_mib(impl, batch_size, device, dtype, args.threads) for impl in ("batched", "looped")
        ]
        print(
            f"| {batch_size} | {batched:.2f} | {looped:.2f} | {looped / batched:.1f}x | {difference:.1e} "
            f"| {memory[0]:.1f} | {memory[1]:.1f} |"
        )


def print_inference_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """The OT module's forward without gradients, as it runs when captioning (the official code runs the per-sample
    Sinkhorn loop there too)."""
    print("| batch | batched (ms) | per-sample loop (ms) | speed-up |")
    print("|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        generator = torch.Generator().manual_seed(batch_size)
        audio = torch.randn(batch_size, NUM_AUDIO, HIDDEN, generator=generator).to(device, dtype)
        visual = torch.randn(batch_size, NUM_VISUAL, HIDDEN, generator=generator).to(device, dtype)
        fusion = build_fusion("ot_att", HIDDEN).to(device)
        batched_fn = torch.no_grad()(functools.partial(fusion, audio, visual))
        looped_fn = torch.no_grad()(functools.partial(looped_ot_attention, audio, visual, fusion.logit_scale))
        batched, looped = median_ms(batched_fn, looped_fn, device, args.repeats, args.clock)
        print(f"| {batch_size} | {batched:.2f} | {looped:.2f} | {looped / batched:.1f}x |")


def print_sinkhorn_table(args: argparse.Namespace, device: torch.device) -> None:
    print("| batch | batched (ms) | per-sample loop (ms) | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        generator = torch.Generator().manual_seed(batch_size)
        visual = normalize_features(torch.randn(batch_size, NUM_VISUAL, HIDDEN, generator=generator))
        audio = normalize_features(torch.randn(batch_size, NUM_AUDIO, HIDDEN, generator=generator))
        similarity = (visual @ audio.transpose(1, 2)).to(device)
        # As the OT module calls it: cosine similarities, so the bound 1 picks the form without a device sync.
        batched_fn = functools.partial(log_sinkhorn, similarity, EPSILON, ITERATIONS, max_abs_similarity=1.0)
        looped_fn = functools.partial(looped_log_sinkhorn, similarity)
        batched, looped = median_ms(batched_fn, looped_fn, device, args.repeats, args.clock)
        difference = (batched_fn() - looped_log_sinkhorn(similarity)).abs().max()
        print(
            f"| {batch_size} | {batched:.2f} | {looped:.2f} | {looped / batched:.1f}x | {difference.item():.1e} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 32, 128])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    add_clock_argument(parser)
    parser.add_argument("--rss-probe", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_clock(parser, args.clock, args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.rss_probe:
        rss_probe(args.rss_probe[0], int(args.rss_probe[1]), dtype)
        return

    device = torch.device(args.device)
    if device.type == "cuda":
        name, memory = torch.cuda.get_device_name(device), "torch.cuda.max_memory_allocated"
    else:
        name, memory = (
            f"cpu ({cpu_name()}), {torch.get_num_threads()} threads",
            "VmHWM growth in a fresh process",
        )
    print(f"device: {name}; input dtype: {args.dtype} (OT math in fp32); torch {torch.__version__}")
    print(
        f"A={NUM_AUDIO}, V={NUM_VISUAL}, C={HIDDEN}, {ITERATIONS} Sinkhorn iterations, "
        f"median of {args.repeats} runs, {args.clock} clock"
    )
    print(f"\nOT module (`ot_att`), forward + backward; peak memory: {memory}\n")
    print_step_table(args, device, dtype)
    print("\nOT module (`ot_att`), forward only, no grad (captioning)\n")
    print_inference_table(args, device, dtype)
    print("\nSinkhorn alone (forward, no grad), on cosine similarities\n")
    print_sinkhorn_table(args, device)


if __name__ == "__main__":
    main()
