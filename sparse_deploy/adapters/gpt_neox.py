from sparse_deploy.adapters.base import Adapter

# GPT-NeoX (Pythia): fused QKV projection; attention and MLP may run in parallel on the block's input.
GPT_NEOX = Adapter(
    model_types=("gpt_neox",),
    kind="decoder",
    layers="layers",
    groups=(
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
)
