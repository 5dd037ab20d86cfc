from sparse_deploy.adapters.base import Adapter

OPT = Adapter(
    model_types=("opt",),
    kind="decoder",
    layers="decoder.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
)
