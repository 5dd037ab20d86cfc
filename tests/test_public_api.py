import subprocess
import sys


def test_public_functions_are_functions_whatever_was_imported_first():
    """The subpackages are nouns (``pruning``, ``exporting``) and the functions verbs, so importing a subpackage
    never rebinds a public function's name on ``sparse_deploy``."""
    code = """
import types
import sparse_deploy
from sparse_deploy import prune as early_prune, export as early_export
import sparse_deploy.pruning.solver, sparse_deploy.exporting.pipeline   # binds the subpackages on sparse_deploy
from sparse_deploy import prune, export, evaluate, benchmark, PruneConfig, ExportConfig, BenchConfig
names = (early_prune, early_export, prune, export, evaluate, benchmark, sparse_deploy.prune, sparse_deploy.export)
print(all(isinstance(f, types.FunctionType) for f in names), early_prune is sparse_deploy.prune)
try:
    sparse_deploy.prune("/no/such/model", "/tmp/out-never-written")
except sparse_deploy.errors.ModelLoadError as exc:
    print("ModelLoadError")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "ModelLoadError"]
