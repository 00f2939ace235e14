"""One training step with PyTorch + transformers, for `cargo bench --bench fuse` (not run in CI).

The same step as the bench: the 124.7M Mistral the bench generates
(target/bench-data/fuse-125m), f32 on CPU, B = 4, L = 512, every position but
each row's last a loss position; loss = 0.9 * CE(labels) + 0.1 * CE against a
top-10 teacher distribution (softmax of the top-k logits, sparse); backward;
clip_grad_norm_(1.0); torch.optim.AdamW step. Prints tokens/s (B * L / seconds
per step, the median of the timed steps after one warm-up step).

    python3 scripts/compare_training.py target/bench-data/fuse-125m [--steps 5] [--threads 2]
"""
import argparse, os, statistics, time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--threads", type=int, default=os.cpu_count())
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
B, L, K = 4, 512, 10
m = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="sdpa")
m.train()
V = m.config.vocab_size
ids = torch.randint(0, V, (B, L))
mask = torch.ones(B, L, dtype=torch.long)
labels = ids[:, 1:]
t_ids = torch.randint(0, V, (B, L - 1, K))
t_vals = (5.0 - 0.3 * torch.arange(K, dtype=torch.float32)).expand(B, L - 1, K)
q = torch.softmax(t_vals, dim=-1)
opt = torch.optim.AdamW(m.parameters(), lr=5e-6, weight_decay=0.0)

def step():
    logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    lm = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean()
    fuse = -(q * logp.gather(-1, t_ids)).sum(-1).mean()
    loss = 0.9 * lm + 0.1 * fuse
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()

step()  # warm-up
times = []
for _ in range(a.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
s = statistics.median(times)
print(f"pytorch {torch.__version__} ({a.threads} threads): train step B={B} L={L}: median {s:.2f}s over {a.steps} steps = {B * L / s:.0f} tokens/s")
