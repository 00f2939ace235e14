"""Make the committed Hugging Face transformers reference in tests/data/hf_reference/.

Not run in CI: the outputs are committed, and a Rust test compares fusechat's decoder
logits against them. For each flavour (llama, mistral, mixtral) this writes a tiny
seeded float32 checkpoint and the logits transformers computes for a right-padded batch:

    tests/data/hf_reference/<flavour>/config.json          tiny model config (HF names)
    tests/data/hf_reference/<flavour>/model.safetensors    f32 weights, HF checkpoint names
    tests/data/hf_reference/<flavour>/reference.safetensors
        input_ids      int64   [2, 12]  row 1 = 7 tokens then 5 pads (id 0)
        attention_mask int64   [2, 12]  1 for real tokens, 0 for the right padding
        logits         float32 [2, 12, 96]
    tests/data/hf_reference/<flavour>/reference.json       versions, command, checks

Regenerate (outside the repository's tree for the environment; only PyPI is needed):

    python3 -m venv /tmp/hfref-venv
    /tmp/hfref-venv/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors==0.8.0 numpy==2.4.6
    /tmp/hfref-venv/bin/python scripts/make_hf_reference.py

Notes on what transformers (5.24.0) does, which the reference therefore encodes:
  * Model forward: float32, eval mode, attn_implementation="eager",
    experts_implementation="eager" (Mixtral), with the attention mask passed.
  * Mistral sliding window: eager attention does apply it. The model builds its mask with
    masking_utils.create_sliding_window_causal_mask whenever config.sliding_window is not
    None, and that mask keeps key j for query i iff  i - sliding_window < j <= i, i.e. each
    query sees at most `sliding_window` keys including itself. With sliding_window 6,
    positions >= 6 lose key 0; the script checks that these positions differ from a run
    with sliding_window=None while positions < 6 are unchanged.
  * Mixtral router (MixtralTopKRouter): softmax over all experts (in f32), top-k, then the
    k weights are divided by their sum. The script checks this numerically too.
  * Transformers 5 keeps Mixtral experts fused in memory (mlp.experts.gate_up_proj /
    down_proj) and converts the classic checkpoint names
    (block_sparse_moe.experts.E.w1/w2/w3) at load time. The checkpoint written here uses
    the classic names; it is loaded with from_pretrained (which must report no missing,
    unexpected or mismatched key) and, independently, converted by hand and loaded with
    load_state_dict(strict=True); both models must hold identical parameters.
  * Padded query positions (row 1, positions 7..11) still get logits in HF: such a query
    attends to the real keys that are causal (and in the window) for it and never to
    padded keys. Compare those positions only if the Rust side uses the same convention.
"""
import hashlib
import json
import os
import shlex
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "hf_reference")

B, L, REAL_ROW1, PAD_ID = 2, 12, 7, 0

SHARED = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 64,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}

FLAVOURS = {
    "llama": (
        1001,
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "mlp_bias": False,
        },
    ),
    "mistral": (
        1002,
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "sliding_window": 6,
        },
    ),
    "mixtral": (
        1003,
        {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": None,
            "router_aux_loss_coef": 0.0,
            "output_router_logits": False,
        },
    ),
}


def make_weights(cfg, rng):
    """HF checkpoint names -> f32 arrays, drawn in a fixed order from `rng`."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    w = {}

    def mat(name, shape):
        w[name] = rng.normal(0.0, 0.2, size=shape).astype(np.float32)

    def norm(name):
        w[name] = (1.0 + rng.normal(0.0, 0.1, size=(h,))).astype(np.float32)

    mat("model.embed_tokens.weight", (v, h))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm.weight")
        mat(p + "self_attn.q_proj.weight", (nh * hd, h))
        mat(p + "self_attn.k_proj.weight", (nkv * hd, h))
        mat(p + "self_attn.v_proj.weight", (nkv * hd, h))
        mat(p + "self_attn.o_proj.weight", (h, nh * hd))
        norm(p + "post_attention_layernorm.weight")
        if cfg["model_type"] == "mixtral":
            mat(p + "block_sparse_moe.gate.weight", (cfg["num_local_experts"], h))
            for e in range(cfg["num_local_experts"]):
                q = p + f"block_sparse_moe.experts.{e}."
                mat(q + "w1.weight", (f, h))  # gate
                mat(q + "w2.weight", (h, f))  # down
                mat(q + "w3.weight", (f, h))  # up
        else:
            mat(p + "mlp.gate_proj.weight", (f, h))
            mat(p + "mlp.up_proj.weight", (f, h))
            mat(p + "mlp.down_proj.weight", (h, f))
    norm("model.norm.weight")
    mat("lm_head.weight", (v, h))
    return w


def to_transformers_state_dict(cfg, w):
    """Hand conversion to the in-memory names of this transformers version (only Mixtral
    differs: experts are fused, w1|w3 -> gate_up_proj [E, 2F, H], w2 -> down_proj [E, H, F])."""
    if cfg["model_type"] != "mixtral":
        return {k: torch.from_numpy(a.copy()) for k, a in w.items()}
    sd = {}
    for k, a in w.items():
        if ".block_sparse_moe.experts." in k:
            continue
        sd[k.replace(".block_sparse_moe.", ".mlp.")] = torch.from_numpy(a.copy())
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        E = range(cfg["num_local_experts"])
        gate_up = np.stack([np.concatenate([w[f"{p}{e}.w1.weight"], w[f"{p}{e}.w3.weight"]], 0) for e in E])
        down = np.stack([w[f"{p}{e}.w2.weight"] for e in E])
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.from_numpy(gate_up)
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.from_numpy(down)
    return sd


def load(d, **overrides):
    kw = dict(dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    if json.load(open(os.path.join(d, "config.json")))["model_type"] == "mixtral":
        kw["experts_implementation"] = "eager"
    model, info = AutoModelForCausalLM.from_pretrained(d, **kw, **overrides)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{d}: from_pretrained reported {bad}"
    model.eval()
    return model


def logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(input_ids=torch.from_numpy(ids), **kw).logits.float().numpy()


def maxdiff(a, b):
    return float(np.max(np.abs(a - b)))


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make(flavour):
    seed, extra = FLAVOURS[flavour]
    cfg = {**SHARED, **extra}
    d = os.path.join(OUT, flavour)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
        fh.write("\n")

    rng = np.random.default_rng(seed)
    w = make_weights(cfg, rng)
    save_file(w, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

    # Inputs: token ids in [1, V) so that the pad id 0 only ever marks padding.
    ids = rng.integers(1, cfg["vocab_size"], size=(B, L)).astype(np.int64)
    mask = np.ones((B, L), dtype=np.int64)
    mask[1, REAL_ROW1:] = 0
    ids[mask == 0] = PAD_ID

    model = load(d)
    if cfg["model_type"] == "mixtral":
        assert model.config._experts_implementation == "eager", model.config._experts_implementation
    assert model.config._attn_implementation == "eager", model.config._attn_implementation

    # Names proven both ways: a from_config model loaded strictly from the hand-converted
    # checkpoint must hold exactly what from_pretrained loaded.
    strict = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32)
    strict.load_state_dict(to_transformers_state_dict(cfg, w), strict=True)
    a, b = model.state_dict(), strict.state_dict()
    assert a.keys() == b.keys(), (set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k

    out = logits(model, ids, mask)
    assert out.shape == (B, L, cfg["vocab_size"]) and out.dtype == np.float32
    save_file(
        {"input_ids": ids, "attention_mask": mask, "logits": out},
        os.path.join(d, "reference.safetensors"),
        metadata={"format": "pt"},
    )

    # Sanity checks.
    checks = {}
    alone1 = logits(model, ids[1:2, :REAL_ROW1])
    checks["row1_first7_vs_alone_maxabs"] = maxdiff(out[1, :REAL_ROW1], alone1[0])
    alone0 = logits(model, ids[0:1])
    checks["row0_vs_alone_maxabs"] = maxdiff(out[0], alone0[0])
    assert checks["row1_first7_vs_alone_maxabs"] < 1e-5, checks
    assert checks["row0_vs_alone_maxabs"] < 1e-5, checks

    if cfg.get("sliding_window"):
        sw = cfg["sliding_window"]
        nowin = logits(load(d, sliding_window=None), ids, mask)
        per_pos = [maxdiff(out[0, t], nowin[0, t]) for t in range(L)]
        checks["sliding_window"] = sw
        checks["row0_vs_no_window_maxabs_per_position"] = per_pos
        checks["row1_pos6_vs_no_window_maxabs"] = maxdiff(out[1, 6], nowin[1, 6])
        assert max(per_pos[:sw]) < 1e-6, per_pos
        assert min(per_pos[sw:]) > 1e-3, per_pos
        assert checks["row1_pos6_vs_no_window_maxabs"] > 1e-3, checks

    if cfg["model_type"] == "mixtral":
        # Router: softmax over all experts, top-k, renormalised to sum 1.
        gate = model.model.layers[0].mlp.gate
        x = torch.from_numpy(np.random.default_rng(seed + 7).normal(size=(16, cfg["hidden_size"])).astype(np.float32))
        with torch.no_grad():
            _, scores, idx = gate(x)
            p = torch.softmax(x @ gate.weight.T, dim=-1)
            top, top_idx = torch.topk(p, cfg["num_experts_per_tok"], dim=-1)
            expect = top / top.sum(-1, keepdim=True)
        checks["router_renorm_maxabs"] = float((scores - expect).abs().max())
        checks["router_scores_sum_minus_1_maxabs"] = float((scores.sum(-1) - 1).abs().max())
        assert torch.equal(idx, top_idx) and checks["router_renorm_maxabs"] < 1e-6, checks

    # Round trip of what was written.
    r = load_file(os.path.join(d, "reference.safetensors"))
    assert np.array_equal(r["input_ids"], ids) and np.array_equal(r["logits"], out)

    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "command": "python scripts/make_hf_reference.py  (from the repository root; see its docstring)",
        "argv": " ".join(shlex.quote(x) for x in [os.path.basename(sys.executable)] + sys.argv),
        "seed": seed,
        "forward": "float32, eval, attn_implementation=eager"
        + (", experts_implementation=eager" if cfg["model_type"] == "mixtral" else "")
        + ", attention_mask passed (right padding, pad id 0)",
        "checks": checks,
        "sha256": {n: sha256(os.path.join(d, n)) for n in ("config.json", "model.safetensors", "reference.safetensors")},
    }
    with open(os.path.join(d, "reference.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
    return checks


def main():
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for flavour in FLAVOURS:
        checks = make(flavour)
        print(f"{flavour}: " + json.dumps(checks))


if __name__ == "__main__":
    main()
