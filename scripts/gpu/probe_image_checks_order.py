"""Do the non-finite checks of `AotpackPipeline.__call__` cost a whole image anything? (issue 11: nothing regresses)

One 1024² 28-step image on diffusers' own `served.pipeline` (no checks) and then through `served(...)` (the VAE's
NaN/Inf checks on latents and pixels), four pairs, diffusers' call first in each (`probe_provenance_cost.py` runs
the checked call first). Random weights (random:flux-dev), random prompt embeddings.

On the GPU machine:
`source scripts/gpu/env.sh && python3 scripts/gpu/probe_image_checks_order.py PACKAGE_DIR OUT.json`
"""

import json, sys, time, torch
from aotpack.models.checkpoint import load_transformer_config, parse_model_ref
from aotpack.models.prepare import torch_dtype
from aotpack.models.random_weights import random_prompt_embeds
from aotpack.runtime.pipeline import load_package
MODEL = "random:flux-dev"
config = load_transformer_config(parse_model_ref(MODEL))
served = load_package(sys.argv[1], MODEL)
embeds, pooled = random_prompt_embeds(config, 1, 512, torch_dtype(served.manifest.dtype), served.device)
kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5)
def t(fn):
    torch.cuda.synchronize(); s = time.perf_counter(); fn(); torch.cuda.synchronize(); return time.perf_counter() - s
out = {"plain_first": [], "checked_second": []}
with torch.no_grad():
    served(**kw, generator=torch.Generator("cpu").manual_seed(0))
    for seed in range(4):
        out["plain_first"].append(t(lambda: served.pipeline(**kw, generator=torch.Generator("cpu").manual_seed(seed))))
        out["checked_second"].append(t(lambda: served(**kw, generator=torch.Generator("cpu").manual_seed(seed))))
print(json.dumps(out)); open(sys.argv[2], "w").write(json.dumps(out, indent=1))
