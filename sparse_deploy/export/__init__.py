"""Export to ONNX with sparse-encoded pruned weights: ``export(checkpoint, output, ExportConfig(...))``."""

import sys
import types

from sparse_deploy.config import ExportConfig
from sparse_deploy.export.pipeline import REPORT_NAME, ExportReport, SparseEncodingWarning, export
from sparse_deploy.export.sparse_encoding import TensorEncoding
from sparse_deploy.export.validate import ParityReport

__all__ = [
    "REPORT_NAME", "ExportConfig", "ExportReport", "ParityReport", "SparseEncodingWarning", "TensorEncoding", "export",
]


class _CallablePackage(types.ModuleType):
    """``sparse_deploy.export`` names both this package and the public ``export()`` function; once the package is
    imported, Python binds the name on ``sparse_deploy`` to the package, so the package calls ``export()``."""

    def __call__(self, *args, **kwargs) -> ExportReport:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
