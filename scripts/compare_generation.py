"""The generation job of `cargo bench --bench generate`, done by transformers'
`generate` (not run in CI): the same 8 prompts (left-padded), greedy, exactly
256 new tokens each (no stop token), f32 on CPU. Prints tokens/s (model loading
excluded).

    cargo bench --bench generate      # writes target/bench-data/generate-prompts.json
    python3 scripts/compare_generation.py target/bench-data/fuse-125m \
        target/bench-data/generate-prompts.json [--new 256] [--threads 2]
"""
import argparse, json, os, time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("prompts")
p.add_argument("--new", type=int, default=256)
p.add_argument("--threads", type=int, default=os.cpu_count())
a = p.parse_args()
torch.set_num_threads(a.threads)
prompts = json.load(open(a.prompts))
m = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="sdpa")
m.eval()
L = max(len(x) for x in prompts)
ids = torch.zeros(len(prompts), L, dtype=torch.long)
mask = torch.zeros(len(prompts), L, dtype=torch.long)
for n, x in enumerate(prompts):
    ids[n, L - len(x):] = torch.tensor(x)
    mask[n, L - len(x):] = 1
t0 = time.perf_counter()
with torch.no_grad():
    out = m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=a.new,
                     min_new_tokens=a.new, eos_token_id=None, pad_token_id=0)
dt = time.perf_counter() - t0
n = (out.shape[1] - L) * len(prompts)
print(f"transformers {torch.__version__} generate ({a.threads} threads): {len(prompts)} prompts x {a.new} new tokens = {n} tokens in {dt:.2f}s = {n / dt:.1f} tokens/s")
