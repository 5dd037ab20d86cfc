"""sparse-deploy: prune Hugging Face models with SparseGPT, export them to sparse ONNX, measure them on CPUs."""

__version__ = "0.1.0"
