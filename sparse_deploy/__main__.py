from sparse_deploy.cli import app

app(prog_name="sparse-deploy")
