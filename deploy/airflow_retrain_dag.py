"""Airflow DAG: clickpipe scheduled retraining, one BashOperator running the same command as cron.

Copy (or symlink) this file into Airflow's dags folder on a worker that has the clickpipe clone with its
.venv (``make install``); set CLICKPIPE_HOME (Airflow Variable or environment) to the clone. Airflow is
not a dependency of clickpipe: nothing else imports it.

The retrain command decides by itself which day to process (the newest complete one not yet processed),
so the DAG passes no date; it exits 0 when it promoted a model, kept the current one, or found nothing
new, 1 when a step failed (the task fails and is retried), 3 when another run holds the registry lock.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow import DAG

try:                                            # Airflow 3: the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:                             # Airflow 2
    from airflow.operators.bash import BashOperator

CLICKPIPE_HOME = os.environ.get("CLICKPIPE_HOME", "/opt/clickpipe")

with DAG(
    dag_id="clickpipe_retrain",
    description="featurize the newest day window, warm-start DeepFM, gate, promote into the registry",
    schedule="15 * * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,                          # the registry lock refuses overlaps anyway
    default_args={"retries": 2, "retry_delay": timedelta(minutes=15), "owner": "clickpipe"},
    tags=["clickpipe", "training"],
) as dag:
    BashOperator(
        task_id="retrain",
        bash_command=(f'cd "{CLICKPIPE_HOME}" && PATH="{CLICKPIPE_HOME}/.venv/bin:$PATH" '
                      "python -m pipeline.retrain --config conf/retrain.yaml"),
        execution_timeout=timedelta(hours=60),  # above the sum of conf/retrain.yaml's step timeouts
    )
