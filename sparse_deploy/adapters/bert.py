from sparse_deploy.adapters.base import Adapter

# BERT-style encoders (all-MiniLM-L6-v2 among them).
BERT = Adapter(
    model_types=("bert",),
    kind="encoder",
    layers="encoder.layer",
    groups=(
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ),
)
