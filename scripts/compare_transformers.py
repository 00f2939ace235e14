"""One-off comparison with Hugging Face transformers (not run in CI).

1. Correctness: load a checkpoint with transformers (float32, eager attention) and
   with `fusechat`'s decoder, and compare logits on a right-padded batch.
2. Speed: time a scoring forward (B=4, L=512) of the 98M bench model with both.

    python3 scripts/compare_transformers.py MODEL_DIR [--speed]

The Rust side is driven through `cargo run --release --example score`, which
writes fusechat's logits for the same token ids to a .npy-like raw file.
"""
import json, subprocess, sys, time, struct, os
import numpy as np
import torch
from transformers import AutoModelForCausalLM

model_dir = sys.argv[1]
speed = "--speed" in sys.argv
torch.set_num_threads(os.cpu_count())
rng = np.random.default_rng(0)
cfg = json.load(open(os.path.join(model_dir, "config.json")))
V = cfg["vocab_size"]
B, L = (4, 512) if speed else (3, 24)
ids = rng.integers(0, V, size=(B, L)).astype(np.int64)
mask = np.ones((B, L), dtype=np.int64)
if not speed:
    mask[1, 17:] = 0  # right padding
    mask[2, 9:] = 0
    ids[mask == 0] = 0

m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
m.eval()
with torch.no_grad():
    m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))  # warm-up
    t0 = time.perf_counter()
    ref = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    t_hf = time.perf_counter() - t0

np.asarray(ids, dtype=np.uint32).tofile("/tmp/fc_ids.bin")
np.asarray(mask, dtype=np.uint32).tofile("/tmp/fc_mask.bin")
out = subprocess.run(
    ["cargo", "run", "--release", "-q", "--example", "score", "--", model_dir, str(B), str(L), "/tmp/fc_ids.bin", "/tmp/fc_mask.bin", "/tmp/fc_logits.bin"],
    capture_output=True, text=True, check=True)
t_fc = float(out.stdout.strip())
ours = np.fromfile("/tmp/fc_logits.bin", dtype=np.float32).reshape(B, L, V)
real = mask.astype(bool)
diff = np.abs(ours - ref)[real].max()
print(f"{cfg.get('model_type')}: max |logit diff| at real positions = {diff:.3e}")
if speed:
    print(f"scoring forward B={B} L={L}: transformers {t_hf:.2f}s ({B*L/t_hf:.0f} tok/s), fusechat {t_fc:.2f}s ({B*L/t_fc:.0f} tok/s), ratio fusechat/transformers time = {t_fc/t_hf:.2f}")
