"""`make interop`, step 2 (the speculators venv, no mtpkit): load mtpkit's export with speculators' own classes and
run its draft on what ``make_case.py`` saved; its logits must be mtpkit's.

    .venv-interop/bin/python interop/check_speculators.py out/interop

1. ``Eagle3DraftModel.from_pretrained`` (speculators' loader, which also reads the verifier's output layer and norm
   from the base the export names) builds the draft from config.json; the loaded state must hold every exported
   tensor, unchanged, and nothing the export lacks but the two training-only tensors it takes from the verifier.
2. Its forward (the training-time test, ``ttt_steps`` = the heads' depth) runs on the base's hidden states of the
   layers the exported config names and on the saved tokens; the logits of every step, caught at ``lm_head``, are
   compared with mtpkit's within ``TOLERANCE``. It runs speculators' default attention (flex attention, which on a
   CPU takes sequences in whole blocks of 128: ``make_case.py`` saves 128 positions).
3. The comparison must be able to fail: the same run with one weight nudged by 0.1 must exceed the tolerance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TOLERANCE = 1e-4  # float32, the same operations in another order
FROM_VERIFIER = {"verifier_lm_head.weight", "verifier_norm.weight"}  # the training loss's, read from the base


def load(export: Path):
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    config = Eagle3SpeculatorConfig.from_pretrained(export)
    model = Eagle3DraftModel.from_pretrained(export, config=config).float().eval()  # its default: flex attention
    exported = load_file(str(export / "model.safetensors"))
    loaded = model.state_dict()
    problems = [f"{name} was not loaded" for name in exported if name not in loaded]
    problems += [f"{name} differs from the export" for name in exported
                 if name in loaded and not torch.equal(loaded[name].to(exported[name].dtype), exported[name])]
    problems += [f"{name} is in the model but not in the export" for name in loaded
                 if name not in exported and name not in FROM_VERIFIER]
    if problems:
        raise SystemExit("speculators loaded the export wrongly: " + "; ".join(problems))
    return model, config


def draft_logits(model, config, case: dict[str, torch.Tensor], depths: int) -> torch.Tensor:
    """Speculators' forward on the case; the logits of each of its ``depths`` steps [depths, T, N]."""
    hidden = torch.cat([case["hidden_states"][i] for i in config.eagle_aux_hidden_state_layer_ids], dim=-1)
    length = hidden.shape[0]
    caught = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: caught.append(output[0].detach()))
    try:
        with torch.no_grad():
            model(hidden_states=hidden.unsqueeze(0), input_ids=case["tokens"].unsqueeze(0),
                  document_ids=torch.zeros(1, length, dtype=torch.long),
                  position_ids=torch.arange(length).unsqueeze(0), ttt_steps=depths)
    finally:
        hook.remove()
    return torch.stack(caught)


def main(work: Path) -> None:
    from importlib.metadata import version

    export = work / "export"
    case = load_file(str(work / "case.safetensors"))
    expected = case["logits"]
    model, config = load(export)
    served = draft_logits(model, config, case, depths=expected.shape[0])
    if served.shape != expected.shape:
        raise SystemExit(f"speculators drafted logits of shape {list(served.shape)}, mtpkit {list(expected.shape)}")
    diff = (served - expected).abs().max().item()
    with torch.no_grad():  # the check must be able to fail: one weight nudged by 0.1 must show
        model.layers[0].self_attn.k_proj.weight[0, 0] += 0.1
    nudged = (draft_logits(model, config, case, depths=expected.shape[0]) - expected).abs().max().item()
    exported = json.loads((export / "config.json").read_text())
    print(f"speculators {version('speculators')} (transformers {version('transformers')}, torch {torch.__version__}): "
          f"loaded {export} as {type(model).__name__}, aux layers "
          f"{config.eagle_aux_hidden_state_layer_ids} (mtpkit's heads: {exported['mtpkit_export']['heads_aux_layers']})")
    print(f"draft logits {list(served.shape)}: max abs diff vs mtpkit {diff:.3e} (tolerance {TOLERANCE:g}); "
          f"with k_proj[0, 0] + 0.1: {nudged:.3e}")
    if not diff <= TOLERANCE:
        raise SystemExit(f"FAIL: speculators' draft differs from mtpkit's by {diff:.3e} > {TOLERANCE:g}")
    if not nudged > TOLERANCE:
        raise SystemExit(f"FAIL: a nudged weight still compares equal ({nudged:.3e}): the comparison cannot fail")
    print("interop: ok")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/interop"))
