"""The scoring job of `fusechat represent`, done by a transformers loop (not run in CI).

Reads the rows (input_ids, label_mask) of a representation fusechat wrote, so
both sides score exactly the same tokens, then does what represent does: batches
of `--batch-size` rows of similar length, right-padded, a forward pass, and at
each loss position the top-10 logits and the cross-entropy of the label.
Prints tokens/s of that loop (model loading excluded).

    python3 scripts/compare_scoring.py MODEL_DIR REPR_DIR [--batch-size 4] [--threads 2]
"""
import argparse, glob, os, time

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("repr")
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--threads", type=int, default=os.cpu_count())
p.add_argument("--k", type=int, default=10)
a = p.parse_args()
torch.set_num_threads(a.threads)
rows = []
for f in sorted(glob.glob(os.path.join(a.repr, "shard-*.safetensors"))):
    t = load_file(f)
    off = t["row_offsets"]
    for r in range(len(t["row_ids"])):
        rows.append((t["input_ids"][off[r]:off[r + 1]].astype(np.int64), t["label_mask"][off[r]:off[r + 1]]))
m = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="sdpa")
m.eval()
order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
tokens = sum(len(r[0]) for r in rows)
t0 = time.perf_counter()
with torch.no_grad():
    for s in range(0, len(order), a.batch_size):
        batch = [rows[i] for i in order[s:s + a.batch_size]]
        L = max(len(x[0]) for x in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for n, (x, _) in enumerate(batch):
            ids[n, :len(x)] = torch.from_numpy(x)
            mask[n, :len(x)] = 1
        logits = m(input_ids=ids, attention_mask=mask).logits
        for n, (x, lab) in enumerate(batch):
            pos = torch.from_numpy(np.nonzero(lab[1:])[0])
            z = logits[n, pos].float()
            topv, topi = z.topk(a.k, dim=-1)
            ce = -torch.log_softmax(z, -1).gather(-1, torch.from_numpy(x)[pos + 1].unsqueeze(-1)).mean()
dt = time.perf_counter() - t0
print(f"transformers {torch.__version__} ({a.threads} threads): scored {len(rows)} rows, {tokens} tokens in {dt:.2f}s = {tokens / dt:.0f} tokens/s")
