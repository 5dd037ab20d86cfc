import subprocess
import sys


def test_public_functions_stay_callable_whatever_was_imported_first():
    code = """
import sparse_deploy
from sparse_deploy import prune as early_prune, export as early_export
import sparse_deploy.prune.solver, sparse_deploy.export.pipeline   # binds the subpackages on sparse_deploy
from sparse_deploy import prune, export, evaluate, benchmark, PruneConfig, ExportConfig, BenchConfig
names = (early_prune, early_export, prune, export, evaluate, benchmark, sparse_deploy.prune, sparse_deploy.export)
print(all(callable(f) for f in names))
try:
    sparse_deploy.prune("/no/such/model", "/tmp/out-never-written")
except sparse_deploy.errors.ModelLoadError as exc:
    print("ModelLoadError")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "ModelLoadError"]
