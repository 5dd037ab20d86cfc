from sparse_deploy.adapters.base import Adapter

# GPT-2 stores its projections as Conv1D, weight [in, out].
GPT2 = Adapter(
    model_types=("gpt2",),
    kind="decoder",
    layers="h",
    groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    conv1d=True,
)
