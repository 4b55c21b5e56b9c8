#!/usr/bin/env python3
"""Build the HF transformers reference fixture that ties EP Lab's CPU reference to `phimoe`.

Run on a machine with torch and transformers >= 5.1 (no GPU needed; everything runs on the CPU in fp32):

    PYTHONUNBUFFERED=1 python3 scripts/hf_moe_fixture.py            # writes tests/data/hf_tiny_phimoe/

What it does, in order:
 1. Makes the weights of a small PhiMoE (hidden 64, 16 experts, top-2, 2 layers, vocab 512) from a fixed seed,
    under the checkpoint's legacy tensor names (`model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight`, ...).
    Every value is rounded to bf16, so the bf16 checkpoint and the fp32 model hold exactly the same numbers.
 2. Loads them with PhimoeForCausalLM.from_pretrained (transformers' own legacy-name conversion) and saves the
    model with save_pretrained in bf16 -- the on-disk format of microsoft/Phi-tiny-MoE-instruct. If this
    transformers version writes its fused expert tensors (`mlp.experts.gate_up_proj`, ...) instead of the
    legacy names, the file is rewritten in the legacy names (fused tensors split), and the script checks that
    transformers loads it back to identical outputs either way.
 3. Runs fixed token ids through the saved model (loaded in fp32, eager experts, eager attention, CPU) and
    records, per layer, from hooks on the MoE block and its router: the block input, the router logits, the
    selected experts, the multipliers and the block output; plus the embedding output, each decoder layer's
    output, the final norm output and the logits (for the full-model chapters).
 4. Also feeds a few hand-made router-logit rows straight to transformers' `sparsemixer` function and records
    its choices: rows that tell sparsemixer apart from plausible misreadings of it (mask factor clamped
    elementwise, 2*eps, second-pass threshold, ties, zero logits), which random inputs almost never do.
 5. Refuses fragile inputs: token ids are drawn again (deterministically) until no decision of sparsemixer
    (expert order, 2*eps mask threshold) is within a relative 1e-4 of flipping, so fp32 summation order in an
    independent implementation cannot change an expert id. It also requires that the masks really mask some
    experts and keep several in others (both sparsemixer passes), with positive and negative top logits.

Output: tests/data/hf_tiny_phimoe/{config.json, model.safetensors, generation_config.json, fixture.safetensors,
fixture.json}. The fixture stores every tensor as F32 (the project's safetensors reader knows BF16, F16, F32):
expert ids and token ids are stored as exact small integers in F32.
"""
import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network that is not there

import torch

try:
    import transformers
    from transformers import PhimoeConfig, PhimoeForCausalLM
    from transformers.models.phimoe import modeling_phimoe
    from safetensors import safe_open
    from safetensors.torch import save_file
except ImportError as e:  # one clear line instead of a traceback
    sys.exit(f"error: {e}. This script needs torch, transformers >= 5 and safetensors (pip install ...).")

SEED = 1234
TOKENS = 32          # tokens in the fixed sequence (one batch row): every layer's MoE block sees these 32 rows
MARGIN = 1e-4        # smallest allowed relative distance of any routing decision from flipping
MAX_ATTEMPTS = 200   # token-id draws tried before giving up


def tiny_config():
    # Phi-tiny-MoE's structure (biases, LayerNorm, GQA, explicit head_dim, sliding window, rope theta 1e4,
    # untied lm_head with bias) at a tiny size.
    return PhimoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=16, num_experts_per_tok=2, router_jitter_noise=0.01, input_jitter_noise=0.0,
        hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096, sliding_window=2047,
        rope_theta=10000.0,  # transformers 5 files it under rope_parameters
        attention_bias=True, lm_head_bias=True, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)


def legacy_names(cfg):
    """Every tensor of the checkpoint, in its on-disk (legacy) name, with its shape and init scale."""
    H, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    D, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    out = [("model.embed_tokens.weight", (V, H), "embed")]
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        for proj, rows in (("q", nq * D), ("k", nkv * D), ("v", nkv * D)):
            out += [(p + f"self_attn.{proj}_proj.weight", (rows, H), "lin"), (p + f"self_attn.{proj}_proj.bias", (rows,), "bias")]
        out += [(p + "self_attn.o_proj.weight", (H, nq * D), "lin"), (p + "self_attn.o_proj.bias", (H,), "bias")]
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out += [(p + ln + ".weight", (H,), "ln_w"), (p + ln + ".bias", (H,), "bias")]
        out.append((p + "block_sparse_moe.gate.weight", (E, H), "router"))
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            out += [(q + "w1.weight", (I, H), "lin"), (q + "w2.weight", (H, I), "lin"), (q + "w3.weight", (I, H), "lin")]
    out += [("model.norm.weight", (H,), "ln_w"), ("model.norm.bias", (H,), "bias"),
            ("lm_head.weight", (V, H), "lin"), ("lm_head.bias", (V,), "bias")]
    return out


def make_weights(cfg, seed):
    """Random weights that keep activations O(1) through the stack, rounded to bf16 values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape, kind in legacy_names(cfg):
        if kind == "embed":
            t = torch.randn(shape, generator=g)
        elif kind == "lin":  # fan-in scaling: outputs ~ N(0, 1) for N(0, 1) inputs
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif kind == "bias":
            t = 0.2 * torch.randn(shape, generator=g)
        elif kind == "ln_w":
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif kind == "router":
            # Sparsemixer's mask is scale-invariant ((top - s_j) / max(|s_j|, top) > 2 eps), so scaling the router
            # alone never makes it keep more than one expert. What makes it keep several is a per-token common
            # offset that is large against the spread between experts: each row gets a shared direction u (the
            # same for all experts) plus its own part. Tokens with a large |u.x| keep 2-4 experts, tokens with a
            # small one keep only the top one, and u.x < 0 gives negative top logits (the elementwise clamp case).
            E, H = shape
            u = torch.randn(H, generator=g) / math.sqrt(H)
            t = 16.0 * u.expand(E, H) + torch.randn(shape, generator=g) / math.sqrt(H)
        else:
            raise AssertionError(kind)
        sd[name] = t.to(torch.bfloat16)
    return sd


def find_moe_block(layer):
    for mod in layer.modules():
        if type(mod).__name__ == "PhimoeSparseMoeBlock":
            return mod
    raise SystemExit("error: no PhimoeSparseMoeBlock in a decoder layer; this transformers version is not supported")


def find_router(block, cfg):
    for name in ("router", "gate"):
        mod = getattr(block, name, None)
        if isinstance(mod, torch.nn.Linear) and mod.out_features == cfg.num_local_experts:
            return mod
    raise SystemExit("error: cannot find the router (a Linear with num_local_experts outputs) in the MoE block")


def run_recorded(model, cfg, ids):
    """Forward pass with hooks; returns a dict of recorded fp32 tensors (batch dimension dropped)."""
    rec, hooks = {}, []
    layers = model.model.layers

    def save(name, t):
        rec[name] = t.detach().reshape(-1, t.shape[-1]).to(torch.float32).clone()

    hooks.append(model.model.embed_tokens.register_forward_hook(lambda m, i, o: save("embed_out", o)))
    hooks.append(model.model.norm.register_forward_hook(lambda m, i, o: save("norm_out", o)))
    for l, layer in enumerate(layers):
        block = find_moe_block(layer)
        router = find_router(block, cfg)
        p = f"layers.{l}."
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, p=p: save(p + "out", o[0] if isinstance(o, tuple) else o)))
        def block_hook(m, i, o, p=p):  # a forward hook must return None, or it replaces the output
            save(p + "moe.x", i[0])
            save(p + "moe.y", o[0] if isinstance(o, tuple) else o)
        hooks.append(block.register_forward_hook(block_hook))

        def router_hook(m, i, o, p=p):
            if isinstance(o, tuple) and len(o) == 3:  # transformers >= 5.3: (logits, multipliers, experts)
                logits, w, sel = o
            elif isinstance(o, tuple):  # 5.1-5.2: (multipliers, experts); the logits are the Linear's output
                w, sel = o
                logits = torch.nn.functional.linear(i[0], m.weight)
            else:  # a router that returns logits only: sparsemixer is applied by the block
                logits = o
                w, sel = modeling_phimoe.sparsemixer(logits, jitter_eps=cfg.router_jitter_noise, training=False)
            save(p + "router_logits", logits)
            save(p + "topk_weights", w)
            save(p + "topk_ids", sel.to(torch.float32))
        hooks.append(router.register_forward_hook(router_hook))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    rec["logits"] = out.logits.detach().reshape(-1, out.logits.shape[-1]).to(torch.float32).clone()
    return rec


def routing_stats(logits, eps):
    """Sparsemixer's decisions recomputed in float64: how close is the nearest one to flipping, and coverage."""
    s = logits.to(torch.float64)
    T, E = s.shape
    scale = s.abs().max(dim=-1).values.clamp(min=1e-6)
    srt = s.sort(dim=-1, descending=True).values
    # ids: e1 = argmax, e2 = argmax of the rest; both flip only if the top-3 order flips
    margin = ((srt[:, 0] - srt[:, 1]) / scale).min().item()
    margin = min(margin, ((srt[:, 1] - srt[:, 2]) / scale).min().item())
    kept = []
    for top in (srt[:, 0:1], srt[:, 1:2]):  # pass 1 threshold = top1, pass 2 threshold = top2 (factor uses s)
        factor = torch.maximum(s.abs(), top)
        ratio = (top - s) / factor
        margin = min(margin, (ratio - 2 * eps).abs().min().item())
        kept.append(((ratio <= 2 * eps) & (s <= top)).sum(dim=-1))  # entries that enter this pass's softmax
    return margin, kept[0], kept[1], srt[:, 0]


def check_routing(rec, cfg):
    """Margin and coverage over all layers; returns (ok, summary line)."""
    eps = cfg.router_jitter_noise
    worst = float("inf")
    k1, k2, tops = [], [], []
    for l in range(cfg.num_hidden_layers):
        m, a, b, top = routing_stats(rec[f"layers.{l}.router_logits"], eps)
        worst = min(worst, m)
        k1.append(a), k2.append(b), tops.append(top)
    k1, k2, tops = torch.cat(k1), torch.cat(k2), torch.cat(tops)
    cov = {
        "pass1_kept1": int((k1 == 1).sum()), "pass1_kept2plus": int((k1 >= 2).sum()),
        "pass2_kept1": int((k2 == 1).sum()), "pass2_kept2plus": int((k2 >= 2).sum()),
        "top_logit_negative": int((tops < 0).sum()), "top_logit_positive": int((tops > 0).sum()),
    }
    ok = worst > MARGIN and all(v >= 3 for v in cov.values())
    return ok, worst, cov


def crafted_router_rows(E):
    """Router logits made by hand, fed straight to transformers' own `sparsemixer` (no GEMM in between, so both
    sides see the very same fp32 numbers and every decision is exact IEEE arithmetic on both sides). Each row
    separates sparsemixer from a plausible misreading of it; the deciding ratio sits 2e-4 or more from 2*eps."""
    far = [-4.0 - 0.25 * i for i in range(E)]  # distinct, far below every top used here: always masked

    def row(**vals):
        r = list(far)
        for k, v in vals.items():
            r[int(k[1:])] = v
        return r
    rows = [
        # negative top: factor = max(|s_j|, top) elementwise keeps s_5 (0.0202/1.0202 = 0.0198 <= 0.02);
        # a factor of |top| would mask it (0.0202 > 0.02)
        row(e2=-1.0, e5=-1.0202),
        # positive top: 2*eps keeps 1.97 (0.015), masks 1.9 (0.05); eps alone would mask 1.97 too
        row(e0=1.9, e7=2.0, e9=1.97),
        # second pass: its threshold is the second logit (1.0), not the first (3.0): 0.985 is kept there
        row(e1=3.0, e4=1.0, e11=0.985),
        # positive first, negative second: the elementwise clamp decides the second pass
        row(e3=0.5, e6=-1.0, e12=-1.0202),
        # many kept: five logits within 2% of the top in both passes (multipliers well below 1/2)
        row(e8=10.0, e9=9.95, e10=9.9, e13=9.85, e14=9.82, e15=9.81),
        # exact ties resolve to the lowest index in both passes (torch.max on the CPU)
        row(e3=2.0, e9=2.0, e10=2.0),
        # all equal: every expert kept, w1 = 1/16, w2 = 1/15
        [0.75] * E,
        # zero top: 0/0 is NaN, and NaN > 2 eps is false, so the zero logits stay in the softmax
        row(e0=0.0, e6=0.0, e7=-0.5),
    ]
    return torch.tensor(rows, dtype=torch.float32)


def state_dict_of(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.startswith("model") and f.endswith(".safetensors"):  # the checkpoint, not fixture.safetensors
            with safe_open(os.path.join(path, f), "pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
    return out


def write_legacy(path, cfg):
    """Rewrites a checkpoint saved with fused expert tensors in the legacy per-expert names."""
    sd = state_dict_of(path)
    I = cfg.intermediate_size
    out = {}
    for k, t in sd.items():
        k2 = k.replace(".mlp.", ".block_sparse_moe.")
        if k2.endswith(".block_sparse_moe.router.weight"):
            out[k2.replace(".router.weight", ".gate.weight")] = t
        elif k2.endswith(".experts.gate_up_proj"):  # [E, 2I, H]: rows [0, I) are w1 (SiLU branch), [I, 2I) w3
            base = k2[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.w1.weight"] = t[e, :I].contiguous()
                out[f"{base}{e}.w3.weight"] = t[e, I:].contiguous()
        elif k2.endswith(".experts.down_proj"):  # [E, H, I]
            base = k2[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.w2.weight"] = t[e].contiguous()
        else:
            out[k2] = t
    for f in os.listdir(path):
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".index.json")):
            os.remove(os.path.join(path, f))
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def load(path, dtype):
    model, info = PhimoeForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation="eager", attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"error: loading {path}: {bad}")
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "tests", "data", "hf_tiny_phimoe"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic fp32 summation order on the CPU
    torch.use_deterministic_algorithms(True)
    major_minor = tuple(int(v) for v in transformers.__version__.split(".")[:2])
    if major_minor < (5, 1):
        # 5.0's phimoe uses RMSNorm instead of LayerNorm and cannot read the checkpoint's block_sparse_moe names
        sys.exit(f"error: transformers {transformers.__version__} has a broken phimoe; use transformers >= 5.1")
    cfg = tiny_config()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, seed {SEED}")

    # 1-2: legacy-named weights -> transformers -> save_pretrained (bf16)
    weights = make_weights(cfg, SEED)
    tmp = tempfile.mkdtemp(prefix="hf_tiny_phimoe_src_")
    try:
        cfg.save_pretrained(tmp)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        src_model = load(tmp, torch.float32)  # legacy checkpoint as transformers reads it: the ground truth
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)
        load(tmp, torch.bfloat16).save_pretrained(args.out)
    finally:
        shutil.rmtree(tmp)
    names = set(state_dict_of(args.out))
    legacy = {n for n, _, _ in legacy_names(cfg)}
    if names == legacy:
        print("save_pretrained wrote the legacy tensor names (block_sparse_moe.experts.{e}.w1/w2/w3, gate)")
    else:
        print(f"save_pretrained wrote other names (e.g. {sorted(names - legacy)[:3]}): rewriting in the legacy names")
        write_legacy(args.out, cfg)
        names = set(state_dict_of(args.out))
        if names != legacy:
            raise SystemExit(f"error: legacy rewrite failed: missing {sorted(legacy - names)[:5]}, extra {sorted(names - legacy)[:5]}")
    on_disk = state_dict_of(args.out)
    for n, t in weights.items():
        if on_disk[n].dtype != torch.bfloat16 or not torch.equal(on_disk[n], t):
            raise SystemExit(f"error: {n} on disk differs from the generated weights")
    print(f"checkpoint: {len(on_disk)} tensors, all bf16 and equal to the generated weights")

    # 3, 5: run fixed token ids, re-drawing them until the routing is robust and covers the cases
    model = load(args.out, torch.float32)
    g = torch.Generator().manual_seed(SEED + 1)
    for attempt in range(MAX_ATTEMPTS):
        ids = torch.randint(3, cfg.vocab_size, (1, TOKENS), generator=g)
        rec = run_recorded(model, cfg, ids)
        ok, margin, cov = check_routing(rec, cfg)
        if ok:
            break
    else:
        raise SystemExit(f"error: no robust token draw in {MAX_ATTEMPTS} attempts (last margin {margin:.2e}, {cov})")
    print(f"token draw {attempt}: smallest routing margin {margin:.2e} (> {MARGIN}), coverage {cov}")

    # The saved checkpoint must reproduce the legacy source exactly (bf16 values survive the fp32 <-> bf16 trips).
    ref = run_recorded(src_model, cfg, ids)
    for k in rec:
        if not torch.equal(rec[k], ref[k]):
            raise SystemExit(f"error: {k} differs between the saved checkpoint and the legacy source checkpoint")
    print("the saved checkpoint and the legacy-named source give bit-identical outputs in transformers")

    # The block's other expert implementations must agree (informative; eager is what is recorded).
    blk = find_moe_block(model.model.layers[0])
    x0 = rec["layers.0.moe.x"].reshape(1, TOKENS, -1)
    for impl in ("grouped_mm", "batched_mm"):
        try:
            model.set_experts_implementation(impl)
            with torch.no_grad():
                y = blk(x0)
            y = (y[0] if isinstance(y, tuple) else y).reshape(TOKENS, -1)
            d = (y - rec["layers.0.moe.y"]).norm() / rec["layers.0.moe.y"].norm()
            print(f"experts_implementation={impl}: rel-L2 vs eager on layer 0 = {d.item():.2e}")
        except Exception as e:  # noqa: BLE001 -- informative only
            print(f"experts_implementation={impl}: not available here ({type(e).__name__}: {str(e)[:80]})")
    model.set_experts_implementation("eager")

    tensors = {"input_ids": ids.reshape(-1).to(torch.float32)}
    tensors.update({k: v.contiguous() for k, v in rec.items()})
    crafted = crafted_router_rows(cfg.num_local_experts)
    cw, cids = modeling_phimoe.sparsemixer(crafted, jitter_eps=cfg.router_jitter_noise, training=False)
    tensors["sparsemixer.logits"] = crafted
    tensors["sparsemixer.ids"] = cids.to(torch.float32).contiguous()
    tensors["sparsemixer.weights"] = cw.to(torch.float32).contiguous()
    print(f"crafted sparsemixer rows: ids {cids.tolist()}")
    print(f"                      weights {[[round(v, 4) for v in r] for r in cw.tolist()]}")
    meta = {
        "what": "HF transformers phimoe reference for EP Lab (scripts/hf_moe_fixture.py); all tensors F32, "
                "batch dimension dropped; ids stored as exact integers in F32",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
        "seed": SEED, "token_draw": attempt, "tokens": TOKENS, "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "experts": cfg.num_local_experts,
        "top_k": cfg.num_experts_per_tok, "vocab": cfg.vocab_size, "router_jitter_noise": cfg.router_jitter_noise,
        "run": "CPU, fp32 model holding the bf16 checkpoint's values, experts_implementation=eager, "
               "attn_implementation=eager, use_cache=False, one sequence, positions 0..tokens-1",
        "routing_margin": margin, "routing_coverage": cov,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "names": {
            "input_ids": "[T] token ids",
            "embed_out": "[T, H] embedding output",
            "layers.{l}.moe.x": "[T, H] input of layer l's MoE block (post_attention_layernorm output)",
            "layers.{l}.router_logits": "[T, E] router logits",
            "layers.{l}.topk_ids": "[T, 2] selected experts (sparsemixer, first then second)",
            "layers.{l}.topk_weights": "[T, 2] their multipliers",
            "layers.{l}.moe.y": "[T, H] MoE block output (before the residual add)",
            "layers.{l}.out": "[T, H] decoder layer output (residual stream)",
            "norm_out": "[T, H] final LayerNorm output",
            "logits": "[T, V] lm_head output",
            "sparsemixer.logits": "[R, E] hand-made router logits (scripts/hf_moe_fixture.py: crafted_router_rows)",
            "sparsemixer.ids": "[R, 2] transformers' sparsemixer on them: experts",
            "sparsemixer.weights": "[R, 2] and multipliers",
        },
    }
    fx = os.path.join(args.out, "fixture.safetensors")
    save_file(tensors, fx, metadata={"format": "pt", "transformers": transformers.__version__, "seed": str(SEED)})
    with open(os.path.join(args.out, "fixture.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    total = 0
    for f in sorted(os.listdir(args.out)):
        size = os.path.getsize(os.path.join(args.out, f))
        total += size
        print(f"wrote {os.path.join(args.out, f)} ({size} bytes)")
    print(f"total {total} bytes")
    if total > 2 * 1024 * 1024:
        raise SystemExit("error: the fixture is over 2 MB")
    print("FIXTURE OK")


if __name__ == "__main__":
    main()
