"""Host time per speculative step: wall time of decoding minus the time inside the base's decoder forwards
(backbone.hidden), per step; the same prompts, heads and kernels for whichever mtpkit is on PYTHONPATH."""
import json, sys, time
import torch
torch.set_num_threads(2)
import mtpkit, mtpkit.api as api
from mtpkit.prompts import load_mt_bench
from mtpkit.chat import prompt_token_ids

heads_dir, draft, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
spec = api.load(heads_dir, draft=draft)
from mtpkit.kernels import use_measured_kernels
use_measured_kernels(spec.heads.backbone, spec.heads)
backbone = spec.heads.backbone
spent = [0.0]
real = backbone.hidden
def timed(*a, **k):
    t = time.perf_counter(); r = real(*a, **k); spent[0] += time.perf_counter() - t; return r
backbone.hidden = timed
logit_time = [0.0]
real_logits = backbone.logits
def timed_logits(hidden, weight=None, bias=None):
    t = time.perf_counter(); r = real_logits(hidden, weight, bias)
    if weight is None:  # the base's own output layer (verification); drafting passes its rows
        logit_time[0] += time.perf_counter() - t
    return r
backbone.logits = timed_logits
questions = load_mt_bench()
# 8 prompts: the first question of each MT-Bench category (measuring only)
seen, prompts = set(), []
for q in questions:
    if q["category"] not in seen:
        seen.add(q["category"]); prompts.append(q["turns"][0])
prompts = prompts[:n]
ids = [torch.tensor([prompt_token_ids(spec.tokenizer, [{"role": "user", "content": p}])]) for p in prompts]
spec.decode(ids[0], 16)  # warm up
rows = []
for x in ids:
    spent[0] = 0.0; logit_time[0] = 0.0
    t = time.perf_counter()
    r = spec.decode(x, int(__import__("os").environ.get("HT_TOKENS", "128")))
    wall = time.perf_counter() - t
    rows.append({"wall": wall, "forward": spent[0], "logits": logit_time[0], "steps": r.forward_passes, "tokens": len(r.tokens)})
steps = sum(r["steps"] for r in rows)
res = {"mtpkit": mtpkit.__file__, "draft": draft, "steps": steps, "tokens": sum(r["tokens"] for r in rows),
       "host_ms_per_step": 1000 * sum(r["wall"] - r["forward"] for r in rows) / steps,
       "host_without_base_logits_ms_per_step": 1000 * sum(r["wall"] - r["forward"] - r["logits"] for r in rows) / steps,
       "base_logits_ms_per_step": 1000 * sum(r["logits"] for r in rows) / steps,
       "forward_ms_per_step": 1000 * sum(r["forward"] for r in rows) / steps,
       "per_prompt_host_ms": [1000 * (r["wall"] - r["forward"]) / r["steps"] for r in rows], "rows": rows}
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "per_prompt_host_ms")}))
