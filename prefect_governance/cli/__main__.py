"""``python -m prefect_governance.cli``."""

from prefect_governance.cli.main import app

app()
