"""Token recycling warm (the heads' corpus successors) against cold (empty table), alone and in the hybrid, with
prompt lookup and the plain greedy control, interleaved per prompt on the same decoders' kernels."""
import json, statistics, sys, time
import torch
torch.set_num_threads(2)
import mtpkit.api as api
from mtpkit.draft_sources import build_decoder
from mtpkit.drafting.recycle import RecycleDrafter
from mtpkit.prompts import load_builtin, load_mt_bench
from mtpkit.chat import prompt_token_ids

heads_dir, per_cat, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spec = api.load(heads_dir, draft="none", fast_kernels=True)
heads = spec.heads

def cold(decoder):
    for d in decoder.proposer.drafters:
        if isinstance(d, RecycleDrafter):
            d.warm = None
    decoder.reset()
    return decoder

decoders = {"greedy": build_decoder(heads, heads_dir, "none"), "pld": build_decoder(heads, heads_dir, "lookup"),
            "recycle-cold": cold(build_decoder(heads, heads_dir, "recycle")),
            "recycle-warm": build_decoder(heads, heads_dir, "recycle"),
            "hybrid-cold": cold(build_decoder(heads, heads_dir, "hybrid")),
            "hybrid-warm": build_decoder(heads, heads_dir, "hybrid")}
sets = {}
for name, records, key in (("dev", load_builtin("heldout"), lambda r: r["prompt"]),
                           ("mt-bench", load_mt_bench(), lambda r: r["turns"][0])):
    count, chosen = {}, []
    for r in records:
        c = r["category"]
        if count.get(c, 0) < per_cat:
            count[c] = count.get(c, 0) + 1; chosen.append(key(r))
    sets[name] = chosen
rows = []
decoders["greedy"].generate(torch.tensor([[1, 2, 3]]), 8)
for set_name, prompts in sets.items():
    for i, p in enumerate(prompts):
        ids = torch.tensor([prompt_token_ids(spec.tokenizer, [{"role": "user", "content": p}])])
        ref = None
        for name, d in decoders.items():
            if hasattr(d, "reset"):
                d.reset()
            t = time.perf_counter(); r = d.generate(ids, 128); wall = time.perf_counter() - t
            ref = ref or r.tokens
            rows.append({"set": set_name, "prompt": i, "method": name, "tps": len(r.tokens) / wall,
                         "acc": r.mean_accepted_tokens, "same": r.tokens == ref})
        print(set_name, i, {x["method"]: round(x["tps"], 1) for x in rows[-len(decoders):]}, flush=True)

def boot(values, n=2000):
    import random
    rng = random.Random(0); meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]
summary = {}
for set_name in sets:
    for name in decoders:
        mine = [r for r in rows if r["set"] == set_name and r["method"] == name]
        base = {r["prompt"]: r["tps"] for r in rows if r["set"] == set_name and r["method"] == "greedy"}
        gains = [r["tps"] / base[r["prompt"]] for r in mine]
        summary[f"{set_name}/{name}"] = {"gain_median": statistics.median(gains), "gain_interval": boot(gains),
                                         "accepted_median": statistics.median(r["acc"] for r in mine),
                                         "accepted_mean": statistics.mean(r["acc"] for r in mine),
                                         "identical": all(r["same"] for r in mine), "prompts": len(mine)}
json.dump({"summary": summary, "rows": rows}, open(out, "w"), indent=1)
for k, v in summary.items():
    print(f"{k:24s} gain {v['gain_median']:.3f} [{v['gain_interval'][0]:.2f}-{v['gain_interval'][1]:.2f}] acc {v['accepted_median']:.2f} (mean {v['accepted_mean']:.2f}) identical {v['identical']}")
