"""Exporting to ONNX with sparse-encoded pruned weights: ``export(checkpoint, output, ExportConfig(...))``."""

from sparse_deploy.config import ExportConfig
from sparse_deploy.exporting.pipeline import REPORT_NAME, ExportReport, SparseEncodingWarning, export
from sparse_deploy.exporting.sparse_encoding import TensorEncoding
from sparse_deploy.exporting.validate import ParityReport

__all__ = [
    "REPORT_NAME", "ExportConfig", "ExportReport", "ParityReport", "SparseEncodingWarning", "TensorEncoding", "export",
]
