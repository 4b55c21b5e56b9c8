#!/usr/bin/env python3
"""The peer for chapter 05's --bench: HF transformers' whole PhimoeForCausalLM at the Phi-tiny-MoE shape, bf16,
random weights, one CUDA GPU, measured at exactly chapter 05's bench shapes, in the same run.

    PYTHONUNBUFFERED=1 python3 scripts/hf_model_bench.py --json hf_model_bench.json
    python3 scripts/hf_model_bench.py --prefill 256 --context 16 --steps 8     # a quick try at small shapes

The model is built from data/phi-tiny-moe/config.json (--config): PhimoeForCausalLM(config) under
torch.device("cuda") with bf16 as the default dtype, seeded random weights (the fused expert tensors drawn
explicitly), no checkpoint, no network. Each combination of an attention implementation ('sdpa'; also
'flash_attention_2' where flash_attn is importable) and an experts implementation transformers 5 registers
('eager', 'grouped_mm', 'batched_mm', picked through the config's `_experts_implementation` as in
hf_moe_bench.py) gets a freshly built model (same weights) and three measurements with the model's own forward
under torch.inference_mode(), as chapter 05's bench does them (run_gpu.cpp: kBench*, bench_decode):

  prefill   one forward over one 2048-token prompt of random ids, use_cache=True (a fresh KV cache each time),
            logits of the last position only; one untimed forward, then the median of 3, each the wall time
            between torch.cuda.synchronize() calls. tokens/s = 2048 / median seconds.
  decode    batch 1 and batch 16: each sequence a 128-token prompt of random ids, prefilled in one forward;
            then greedy steps feeding the argmax of the last logits back with the past_key_values the model
            returned (DynamicCache in transformers 5): 4 warm-up steps, then 64 timed between
            torch.cuda.synchronize() calls. tokens/s = 64 * batch / seconds.

Chapter 05 differs only in being itself: its own kernels, CUDA graphs for decode, a host-side argmax. A model
that cannot be built is reported and its combination skipped; a measurement that raises (e.g. out of memory:
batched_mm copies expert weights per (token, expert) pair) is reported and left null. Exits non-zero with one
`error:` line when torch has no CUDA, transformers has no PhimoeForCausalLM, or nothing could be measured.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; never wait on a network that is not there

try:
    import torch
except ImportError as e:
    sys.exit(f"error: {e}. This script needs torch (CUDA build) and transformers >= 5.")
try:
    import transformers
    from transformers import PhimoeConfig, PhimoeForCausalLM
except ImportError as e:
    sys.exit(f"error: transformers is missing or too old (no PhimoeForCausalLM: {e}); this script needs >= 5.")

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = ["eager", "grouped_mm", "batched_mm"]
BATCHES = (1, 16)
METRICS = ("prefill_tok_s", "decode_b1_tok_s", "decode_b16_tok_s")


def experts_impls():
    """The experts implementations this transformers registers ('eager' is built in), as hf_moe_bench.py does."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        registered = set(ALL_EXPERTS_FUNCTIONS.keys())
    except ImportError:
        registered = set()
        print(f"transformers {transformers.__version__} has no experts implementations: only its own 'eager' loop")
    for impl in EXPERTS:
        if impl != "eager" and impl not in registered:
            print(f"experts {impl}: not registered in this transformers; skipped")
    return [i for i in EXPERTS if i == "eager" or i in registered]


def attn_impls():
    try:
        from transformers.utils import is_flash_attn_2_available
        fa2 = is_flash_attn_2_available()
    except ImportError:
        fa2 = False
    if not fa2:
        print("attention flash_attention_2: flash_attn not importable here; skipped")
    return ["sdpa", "flash_attention_2"] if fa2 else ["sdpa"]


def build(cfg_dict, attn, experts, seed):
    cfg = PhimoeConfig.from_dict(dict(cfg_dict))
    cfg._attn_implementation = attn
    cfg._experts_implementation = experts
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = PhimoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # the fused expert tensors start as torch.empty in transformers 5: give them values
        for mod in model.modules():
            if type(mod).__name__.endswith("Experts"):
                for p in mod.parameters():
                    p.normal_(0.0, cfg.initializer_range)
    got = (model.config._attn_implementation, getattr(model.config, "_experts_implementation", experts))
    if got != (attn, experts):
        raise RuntimeError(f"transformers chose attention {got[0]}, experts {got[1]} instead")
    return model.eval()


def random_ids(vocab, batch, n, seed):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed)).to("cuda")


def prefill_tok_s(model, ids, runs=3):
    first = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # untimed: allocator, kernel choices
    finite = bool(torch.isfinite(first.logits).all())
    del first
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    return ids.shape[1] / statistics.median(times), finite


def decode_tok_s(model, ids, warmup, steps):
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    kind = type(cache).__name__
    del out

    def step(tok, cache):
        o = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return o.logits[:, -1].argmax(-1, keepdim=True), o.past_key_values

    for _ in range(warmup):
        tok, cache = step(tok, cache)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok, cache = step(tok, cache)
    torch.cuda.synchronize()
    return steps * ids.shape[0] / (time.perf_counter() - t0), kind


def short(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def run_combo(cfg_dict, attn, experts, args, failed):
    """One combination's three measurements; one that raises is recorded in `failed` and left None."""
    name = f"{attn}+{experts}"
    model = build(cfg_dict, attn, experts, args.seed)
    vocab = model.config.vocab_size
    jobs = [("prefill_tok_s", lambda: prefill_tok_s(model, random_ids(vocab, 1, args.prefill, args.seed + 1)))]
    for b in BATCHES:
        jobs.append((f"decode_b{b}_tok_s", lambda b=b: decode_tok_s(
            model, random_ids(vocab, b, args.context, args.seed + 1 + b), args.warmup, args.steps)))
    res, notes = {}, []
    with torch.inference_mode():
        for key, job in jobs:
            try:
                res[key], extra = job()
                if key == "prefill_tok_s" and not extra:
                    notes.append("NON-FINITE logits: routing may be degenerate")
                elif key != "prefill_tok_s" and extra not in notes:
                    notes.append(extra)
            except Exception as e:  # noqa: BLE001 -- out of memory and the like: report, keep going
                res[key] = None
                failed[f"{name} {key}"] = short(e)
                print(f"{name}: {key} failed ({short(e)})")
            gc.collect()
            torch.cuda.empty_cache()
    notes.append(f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model
    return res, notes


def main():
    ap = argparse.ArgumentParser(description="HF PhimoeForCausalLM prefill/decode tokens/s "
                                             "(the peer for chapter 05 --bench)")
    ap.add_argument("--config", default=str(ROOT / "data/phi-tiny-moe/config.json"), help="HF config.json")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--prefill", type=int, default=2048, help="tokens of the one prefill prompt")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per sequence before decode")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps before them")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if min(args.prefill, args.context, args.steps) < 1 or args.warmup < 0:
        sys.exit("error: --prefill, --context and --steps must be >= 1, --warmup >= 0")
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU visible to torch (this benchmark runs on a GPU with a CUDA build of torch)")
    try:
        with open(args.config) as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read the model config {args.config}: {e}")

    gpu = torch.cuda.get_device_name()
    gmm = ("torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else
           "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else "none")
    print(f"GPU {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
          f"{transformers.__version__}, torch grouped GEMM: {gmm}")
    shape = {"config": args.config, "hidden": c.get("hidden_size"), "layers": c.get("num_hidden_layers"),
             "experts": c.get("num_local_experts"), "top_k": c.get("num_experts_per_tok"),
             "intermediate": c.get("intermediate_size"), "vocab": c.get("vocab_size"), "dtype": "bf16",
             "prefill_tokens": args.prefill, "prefill_runs": 3, "context": args.context,
             "warmup_steps": args.warmup, "decode_steps": args.steps, "batches": list(BATCHES)}
    print("PhimoeForCausalLM, random weights: " + ", ".join(f"{k} {v}" for k, v in shape.items()))

    results, failed = {}, {}
    attns, expertss = attn_impls(), experts_impls()
    for attn in attns:
        for experts in expertss:
            name = f"{attn}+{experts}"
            torch.cuda.reset_peak_memory_stats()
            try:
                res, notes = run_combo(c, attn, experts, args, failed)
            except Exception as e:  # noqa: BLE001 -- the model could not be built: report and skip
                failed[name] = short(e)
                print(f"{name}: skipped ({short(e)})")
                res = None
            gc.collect()
            torch.cuda.empty_cache()
            if res is None:
                continue
            results[name] = res
            cells = [f"{res[k]:.1f}" if res[k] is not None else "failed" for k in METRICS]
            print(f"{name:28s} tokens/s: prefill {cells[0]:>8}  decode b1 {cells[1]:>7}  decode b16 {cells[2]:>7}"
                  f"  ({', '.join(notes)})")

    best = {}
    for k in METRICS:
        have = {n: r[k] for n, r in results.items() if r.get(k) is not None}
        if have:
            b = max(have, key=have.get)
            best[k] = {"impl": b, "value": have[b]}
            print(f"best {k:17s} {b:30s} {have[b]:10.1f} tok/s")
    if args.json:
        out = {"what": "HF transformers PhimoeForCausalLM, own forward + KV cache, tokens/s at chapter 05's bench "
                       "shapes (prefill: median of 3 after 1 untimed; decode: greedy, warm-up then timed steps)",
               "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
               "transformers": transformers.__version__, "shape": shape,
               "results": results, "best": best, "failed": failed}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    if not best:
        sys.exit("error: every combination failed (" + "; ".join(f"{k}: {v}" for k, v in failed.items())[:400] + ")")


if __name__ == "__main__":
    main()
