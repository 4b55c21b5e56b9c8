#!/usr/bin/env python3
"""The peer benchmark for chapter 02: HF transformers' PhimoeSparseMoeBlock (one MoE block: router, sparsemixer,
experts) at the Phi-tiny-MoE shape, bf16, on one CUDA GPU, random weights.

    PYTHONUNBUFFERED=1 python3 scripts/hf_moe_bench.py --json hf_moe_bench.json

For T = 1, 8, 64, 512, 4096, 16384 tokens and each experts implementation that transformers 5 offers for this
block ('eager': a Python loop over the experts that were hit; 'grouped_mm': tokens sorted by expert and one
grouped GEMM per projection; 'batched_mm': every (token, expert) pair gathers its own copy of its expert's weights
and runs a batched GEMV), it prints the median time of one forward over many iterations (CUDA events, after
warm-up) and TFLOP/s, then the best implementation per T. The implementation is chosen the way transformers 5
does it: the config's `_experts_implementation` (what `from_pretrained(..., experts_implementation=...)` and
`model.set_experts_implementation(...)` set), which PhimoeExperts reads on every forward.

batched_mm materialises 2*T gathered copies of expert weights (11 MB each at this shape), so it is skipped
at the T where that would not fit in free GPU memory; an implementation that fails is reported and skipped.
"""
import argparse
import json
import statistics
import sys
import time

import torch

try:
    import transformers
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock
except ImportError as e:
    sys.exit(f"error: {e}. This script needs torch (CUDA build) and transformers >= 5.")

H, I, E, K = 4096, 448, 16, 2            # Phi-tiny-MoE: hidden, expert intermediate, experts, top-k
TOKENS = [1, 8, 64, 512, 4096, 16384]
IMPLS = ["eager", "grouped_mm", "batched_mm"]


def available_impls():
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        registered = set(ALL_EXPERTS_FUNCTIONS.keys())
    except ImportError:
        registered = set()
    out = []
    for impl in IMPLS:
        if impl == "eager" or impl in registered:
            out.append(impl)
        else:
            print(f"{impl}: not registered in this transformers ({transformers.__version__}); skipped")
    return out


def grouped_mm_path(block, x):
    """Whether transformers' grouped_mm uses torch's native grouped GEMM here, or its per-expert fallback loop."""
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
        offs = torch.tensor([x.shape[0]] * E, dtype=torch.int32, device=x.device)
        native = _can_use_grouped_mm(x, block.experts.gate_up_proj.transpose(-2, -1), offs)
    except Exception:  # noqa: BLE001 -- private helper; absent or changed in other versions
        return "unknown"
    fn = "torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "torch._grouped_mm"
    return f"native {fn}" if native else "transformers' fallback loop (no native grouped_mm for this GPU/torch)"


def make_block(impl, seed, device):
    cfg = PhimoeConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                       router_jitter_noise=0.01, input_jitter_noise=0.0, hidden_act="silu")
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    block = PhimoeSparseMoeBlock(cfg)
    with torch.no_grad():  # the expert tensors are created with torch.empty: give every parameter real values
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(device=device, dtype=torch.bfloat16).eval()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_block(block, x, budget_s, max_iters, min_iters):
    """Median ms of one forward, CUDA events per iteration; iteration count from a short probe."""
    dev = x.device.type
    with torch.inference_mode():
        for _ in range(3):
            block(x)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(3):
            block(x)
        sync(dev)
        per = (time.perf_counter() - t0) / 3
        n = int(min(max_iters, max(min_iters, budget_s / max(per, 1e-6))))
        if dev != "cuda":  # --device cpu: a smoke test of this script, wall-clock per iteration
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                block(x)
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times), n
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            a.record()
            block(x)
            b.record()
        torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev), n


def main():
    ap = argparse.ArgumentParser(description="HF PhimoeSparseMoeBlock benchmark (the peer for chapter 02 --bench)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated T values")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timed iterations per (impl, T)")
    ap.add_argument("--max-iters", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: only a smoke test of this script (slow, not a measurement)")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU visible to torch (this benchmark runs on a GPU with a CUDA build of torch)")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        sys.exit(f"error: --tokens must be comma-separated integers, got '{args.tokens}'")
    if any(t < 1 for t in tokens):
        sys.exit("error: every --tokens value must be >= 1")
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "CPU (smoke test, not a measurement)"
    print(f"GPU {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
    print(f"PhimoeSparseMoeBlock: hidden {H}, intermediate {I}, {E} experts, top-{K}, sparsemixer, bf16")
    impls = available_impls()

    # Same weights and inputs for every implementation: check they agree before timing them.
    x64 = torch.randn(64, H, generator=torch.Generator().manual_seed(args.seed + 1)).to(dev, torch.bfloat16)
    ref = None
    blocks = {}
    for impl in list(impls):
        try:
            blocks[impl] = make_block(impl, args.seed, dev)
            with torch.inference_mode():
                y = blocks[impl](x64.unsqueeze(0)).float()
            sync(dev)
        except Exception as e:  # noqa: BLE001
            print(f"{impl}: fails here ({type(e).__name__}: {str(e)[:120]}); skipped")
            impls.remove(impl)
            blocks.pop(impl, None)
            continue
        ref = y if ref is None else ref
        rel = ((y - ref).norm() / ref.norm()).item()
        note = f", {grouped_mm_path(blocks[impl], x64)}" if impl == "grouped_mm" else ""
        print(f"{impl}: rel-L2 vs {impls[0]} at T=64 = {rel:.2e}{note}")

    results = {impl: {} for impl in impls}
    gathered_bytes = 3 * H * I * 2  # one (token, expert) pair's gathered w1|w3 and w2 in bf16 (batched_mm)
    for T in tokens:
        x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(args.seed + T)).to(dev, torch.bfloat16)
        for impl in impls:
            if impl == "batched_mm":
                need = K * T * gathered_bytes
                free = torch.cuda.mem_get_info()[0] if dev == "cuda" else 8 << 30
                if need > 0.7 * free:
                    print(f"T={T:6d} {impl:10s}  skipped: gathers {need / 2**30:.1f} GiB of expert weights, "
                          f"{free / 2**30:.1f} GiB free")
                    continue
            try:
                ms, n = time_block(blocks[impl], x, args.budget, args.max_iters, 10 if dev == "cuda" else 1)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"T={T:6d} {impl:10s}  skipped: out of GPU memory")
                continue
            results[impl][T] = ms
            tflops = 2 * T * K * 3 * H * I / (ms * 1e-3) / 1e12
            print(f"T={T:6d} {impl:10s} {ms * 1e3:10.1f} us  {tflops:7.2f} TFLOP/s (experts)  [{n} iters]")
        del x
        if dev == "cuda":
            torch.cuda.empty_cache()

    best = {}
    print("\nbest per T (HF transformers PhimoeSparseMoeBlock, " + gpu + ")")
    print(f"{'T':>6}  {'best impl':10}  {'median':>10}  " + "  ".join(f"{i:>10}" for i in impls))
    for T in tokens:
        have = {i: results[i][T] for i in impls if T in results[i]}
        if not have:
            continue
        b = min(have, key=have.get)
        best[T] = {"impl": b, "ms": have[b]}
        cells = "  ".join(f"{have[i]:8.3f}ms" if i in have else f"{'-':>10}" for i in impls)
        print(f"{T:6d}  {b:10}  {have[b]:8.3f}ms  {cells}")
    if args.json:
        out = {
            "what": "HF transformers PhimoeSparseMoeBlock forward (router + sparsemixer + experts), median ms",
            "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "shape": {"hidden": H, "intermediate": I, "experts": E, "top_k": K, "dtype": "bf16"},
            "results_ms": {i: {str(T): ms for T, ms in r.items()} for i, r in results.items()},
            "best": {str(T): v for T, v in best.items()},
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
