"""Export to ONNX with sparse-encoded pruned weights: ``export(checkpoint, output, ExportConfig(...))``."""

from sparse_deploy._callable import make_callable
from sparse_deploy.config import ExportConfig
from sparse_deploy.export.pipeline import REPORT_NAME, ExportReport, SparseEncodingWarning, export
from sparse_deploy.export.sparse_encoding import TensorEncoding
from sparse_deploy.export.validate import ParityReport

__all__ = [
    "REPORT_NAME", "ExportConfig", "ExportReport", "ParityReport", "SparseEncodingWarning", "TensorEncoding", "export",
]


make_callable(__name__, "sparse_deploy.export.pipeline:export")
