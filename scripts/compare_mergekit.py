#!/usr/bin/env python3
"""fusechat merges against mergekit's, byte for byte, on a small Mistral-shaped model set.

    pip install mergekit==0.1.5        # brings torch and safetensors
    python scripts/compare_mergekit.py --fusechat target/release/fusechat [--keep DIR]

Writes a base and two fine-tunes (bf16; hidden 64, 2 layers, vocab 256), then for each case
runs `mergekit-yaml` and `fusechat merge --mergekit` on the same YAML, with fusechat's default
numerics and with `--numerics mergekit`, and prints per case: the share of output elements whose
values are identical to mergekit's, the largest difference in bf16 ulps, and, for the cases that
mergekit can also run in float64, the mean distance of each output from that exact value (in
ulps). Random methods (DARE, DELLA) draw other masks: for them the kept share is printed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 256


def config():
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def shapes():
    hd = HIDDEN // HEADS
    s = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
         "lm_head.weight": (VOCAB, HIDDEN)}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        s.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV * hd, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * hd, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    return s


def write_models(root):
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(sh, generator=g) * 0.02 for n, sh in shapes().items()}
    models = {"base": base}
    for name in ["a", "b"]:
        # fine-tunes: small changes, so that bf16 rounding of the deltas matters
        models[name] = {n: t + torch.randn(t.shape, generator=g) * 2e-3 for n, t in base.items()}
    # c: b with one added token (a row more in the embeddings and lm_head), for tokenizer_source
    models["c"] = dict(models["b"])
    for n in ["model.embed_tokens.weight", "lm_head.weight"]:
        models["c"][n] = torch.cat([models["b"][n], torch.randn(1, HIDDEN, generator=g) * 0.02])
    for name, tensors in models.items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        save_file({n: t.to(torch.bfloat16).contiguous() for n, t in tensors.items()},
                  os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        cfg = config()
        extra = ["<extra>"] if name == "c" else []
        cfg["vocab_size"] = VOCAB + len(extra)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        write_tokenizer(d, extra)


def write_tokenizer(d, extra):
    """A word-level tokenizer of VOCAB words, plus `extra` added tokens."""
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    added = [{"id": VOCAB + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(extra)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
           "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}, f)


CASES = {
    # FuseChat's published configs (TA, TIES, DARE), with the paths of the test set
    "task_arithmetic": "models:\n  - model: {base}\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 1.0}}\nmerge_method: task_arithmetic\nbase_model: {base}\nparameters:\n  normalize: true\ndtype: {dtype}\n",
    "ties": "models:\n  - model: {base}\n  - model: {a}\n    parameters: {{density: 0.5, weight: 0.25}}\n  - model: {b}\n    parameters: {{density: 0.5, weight: 0.5}}\nmerge_method: ties\nbase_model: {base}\nparameters:\n  normalize: true\ndtype: {dtype}\n",
    "dare_ties": "models:\n  - model: {base}\n  - model: {a}\n    parameters: {{density: 0.5, weight: 0.5}}\n  - model: {b}\n    parameters: {{density: 0.5, weight: 0.5}}\nmerge_method: dare_ties\nbase_model: {base}\nparameters:\n  normalize: true\ndtype: {dtype}\n",
    "breadcrumbs_ties": "models:\n  - model: {base}\n  - model: {a}\n    parameters: {{density: 0.6, weight: 0.5, gamma: 0.05}}\n  - model: {b}\n    parameters: {{density: 0.6, weight: 0.7, gamma: 0.05}}\nmerge_method: breadcrumbs_ties\nbase_model: {base}\ndtype: {dtype}\n",
    "della": "models:\n  - model: {base}\n  - model: {a}\n    parameters: {{density: 0.5, weight: 0.5, epsilon: 0.1}}\n  - model: {b}\n    parameters: {{density: 0.5, weight: 0.5, epsilon: 0.1}}\nmerge_method: della\nbase_model: {base}\ndtype: {dtype}\n",
    "linear": "models:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 3.0}}\nmerge_method: linear\ndtype: {dtype}\n",
    "slerp": "slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n      - model: {b}\n        layer_range: [0, 2]\nmerge_method: slerp\nbase_model: {a}\nparameters:\n  t: [0, 0.5, 1]\ndtype: {dtype}\n",
    "model_stock": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: model_stock\nbase_model: {base}\ndtype: {dtype}\n",
    "nuslerp": "models:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 2.0}}\nmerge_method: nuslerp\nbase_model: {base}\ndtype: {dtype}\n",
    "multislerp": "models:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 2.0}}\nmerge_method: multislerp\ndtype: {dtype}\n",
    "karcher": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: karcher\ndtype: {dtype}\n",
    "nearswap": "models:\n  - model: {a}\nmerge_method: nearswap\nbase_model: {base}\nparameters:\n  t: 0.001\ndtype: {dtype}\n",
    "arcee_fusion": "models:\n  - model: {a}\nmerge_method: arcee_fusion\nbase_model: {base}\ndtype: {dtype}\n",
    "linear_union": "models:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {c}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\nbase_model: {a}\ntokenizer_source: union\ndtype: {dtype}\n",
    "ties_union": "models:\n  - model: {a}\n    parameters: {{density: 0.5, weight: 0.5}}\n  - model: {c}\n    parameters: {{density: 0.5, weight: 0.5}}\nmerge_method: ties\nbase_model: {base}\ntokenizer_source: union\ndtype: {dtype}\n",
    "passthrough": "slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n  - sources:\n      - model: {b}\n        layer_range: [1, 2]\nmerge_method: passthrough\ndtype: {dtype}\n",
}
RANDOM = {"dare_ties", "della"}
# density of the magnitude-trimmed cases, to find the elements at the trimming threshold
# (density, gamma) of the magnitude-trimmed cases, to find the elements at a trimming threshold
TRIMMED = {"ties": (0.5, 0.0), "breadcrumbs_ties": (0.6, 0.05)}


def at_threshold(paths, t, density, gamma):
    """Elements whose |δ| (bf16) equals the magnitude at either end of the kept
    range of some model: which of these are kept depends on the sort's order
    among equal values."""
    base = load_file(os.path.join(paths["base"], "model.safetensors"))[t].float()
    mask = torch.zeros(base.shape, dtype=torch.bool)
    for m in ["a", "b"]:
        d = (load_file(os.path.join(paths[m], "model.safetensors"))[t].float() - base).to(torch.bfloat16).float().abs()
        n = d.numel()
        target = max(1, int(density * n)) if gamma == 0 else int(density * n)
        bot = max(0, n - target - int(gamma * n))
        asc = torch.sort(d.reshape(-1)).values
        for v in {asc[bot].item(), asc[min(n, bot + target) - 1].item()}:
            mask |= d == v
    return mask
ROUNDED = {"task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "linear", "ties_union"}


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")


def ulps(a, b):
    """|a − b| in units of the bf16 spacing at b."""
    a, b = a.double(), b.double()
    # the spacing at the larger magnitude, and no finer than at 2^-24 (so that
    # values at or near 0 do not blow the ratio up)
    m = torch.maximum(a.abs(), b.abs()).clamp(min=2.0**-24)
    spacing = torch.ldexp(torch.ones_like(m), torch.frexp(m)[1] - 8)
    return ((a - b).abs() / spacing)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fusechat", default="target/release/fusechat")
    ap.add_argument("--keep", help="keep the work directory here")
    ap.add_argument("--only", nargs="*", help="run only these cases")
    args = ap.parse_args()
    fusechat = os.path.abspath(args.fusechat)
    root = args.keep or tempfile.mkdtemp(prefix="fc-vs-mk-")
    os.makedirs(root, exist_ok=True)
    write_models(root)
    paths = {k: os.path.join(root, k) for k in ["base", "a", "b", "c"]}
    print(f"{'case':18} {'mode':9} {'identical':>10} {'max ulps':>9} {'mean ulps vs f64':>17} {'kept':>6}")
    for name, text in CASES.items():
        if args.only and name not in args.only:
            continue
        outs = {}
        for dtype in ["bfloat16", "float64"] if name not in RANDOM else ["bfloat16"]:
            cfg = os.path.join(root, f"{name}-{dtype}.yml")
            with open(cfg, "w") as f:
                f.write(text.format(dtype=dtype, **paths))
            out = os.path.join(root, f"mk-{name}-{dtype}")
            shutil.rmtree(out, ignore_errors=True)
            run(["mergekit-yaml", cfg, out])
            outs[("mergekit", dtype)] = load_file(os.path.join(out, "model.safetensors"))
        cfg = os.path.join(root, f"{name}-bfloat16.yml")
        modes = ["fusechat", "mergekit"] if name in ROUNDED else ["fusechat"]
        for mode in modes:
            out = os.path.join(root, f"fc-{name}-{mode}")
            run([fusechat, "merge", "--mergekit", cfg, "--out", out, "--force", "--numerics", mode])
            got = load_file(os.path.join(out, "model.safetensors"))
            want = outs[("mergekit", "bfloat16")]
            exact = outs.get(("mergekit", "float64"))
            n = same = 0
            dtypes = set()
            worst = 0.0
            dist = 0.0
            kept = []
            outside = 0
            for t, w in want.items():
                g = got[t]
                n += w.numel()
                if name in TRIMMED and mode == "mergekit":
                    outside += ((g.double() != w.double()) & ~at_threshold(paths, t, *TRIMMED[name])).sum().item()
                if g.dtype != w.dtype:
                    dtypes.add(f"{t}: fusechat {g.dtype}, mergekit {w.dtype}")
                same += (g.double() == w.double()).sum().item()
                worst = max(worst, ulps(g, w).max().item())
                if exact is not None:
                    dist += ulps(g, exact[t]).sum().item()
                if name in RANDOM:
                    base = load_file(os.path.join(paths["base"], "model.safetensors"))[t]
                    kept.append(((g.float() - base.float()) != 0).float().mean().item())
            mean_exact = f"{dist / n:.4f}" if exact is not None else "-"
            k = f"{sum(kept) / len(kept):.3f}" if kept else "-"
            print(f"{name:18} {mode:9} {same / n:10.4%} {worst:9.1f} {mean_exact:>17} {k:>6}")
            if name in TRIMMED and mode == "mergekit":
                print(f"{'':18} differing elements not at a trimming threshold (tie order): {outside}")
            if dtypes:
                print(f"{'':18} dtypes differ in {len(dtypes)} tensors, e.g. {sorted(dtypes)[0]}")
        if ("mergekit", "float64") in outs:
            w, e = outs[("mergekit", "bfloat16")], outs[("mergekit", "float64")]
            d = sum(ulps(w[t], e[t]).sum().item() for t in w) / sum(x.numel() for x in w.values())
            print(f"{name:18} {'mergekit':9} {'(itself)':>10} {'':>9} {d:17.4f} {'':>6}")
        if name in RANDOM:
            w = outs[("mergekit", "bfloat16")]
            base = load_file(os.path.join(paths["base"], "model.safetensors"))
            k = sum(((w[t].float() - base[t].float()) != 0).float().mean().item() for t in w) / len(w)
            print(f"{name:18} {'mergekit':9} {'(itself)':>10} {'':>9} {'-':>17} {k:6.3f}")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
