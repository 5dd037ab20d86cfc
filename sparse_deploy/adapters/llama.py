from sparse_deploy.adapters.base import Adapter

# Llama, Mistral and Qwen2 share module names: grouped-query attention, gated MLP; the rotary position
# embeddings arrive as a keyword argument of every block and are captured with the first block's inputs.
LLAMA = Adapter(
    model_types=("llama", "mistral", "qwen2"),
    kind="decoder",
    layers="layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)
