"""Apache Airflow 3 DAG: the nightly GA360 -> WALS run, one `pipeline.run` stage per task.

    preprocess >> train >> gate >> predict >> export >> publish

- preprocess, train and predict are Beam pipelines, run by BeamRunPythonPipelineOperator on
  Dataflow (`pipeline/run.py --stages STAGE`); their job names come from the logical date
  (`ga-wals-<stage>-{{ ds_nodash }}`, no random suffix), so a retried task finds its own job,
  and `check_if_running` waits for a job of that name still running instead of starting a
  duplicate. `pipeline.run` itself skips a stage its run.json records as done.
- gate, export and publish run `python -m pipeline.run --stages STAGE` on the worker. The gate
  task fails when the candidate is rejected (exit status 1), so export and publish never run
  and the published model stays live. The gate scores on Dataflow (`--distributed` and the
  Dataflow flags: the Airflow worker only launches its jobs and reads their metrics), and so
  does publish when it must judge the run again against a model published since. Export gets
  GA_WALS_TRAIN_FLAGS too, so that it serves the --export_k and --serving_model the train task
  exported with, and copies that SavedModel instead of streaming the model again.

Settings come from environment variables of the Airflow workers (on Cloud Composer: the
environment's "Environment variables"), read when the DAG file is parsed:

    GA_WALS_SCHEDULE      cron schedule (default "0 21 * * *", daily at 21:00)
    GA_WALS_ROOT          pipeline.run --root, e.g. gs://my-bucket/ga-wals
    GA_WALS_INPUT         pipeline.run --input, e.g. gs://my-bucket/ga360/ga_sessions_{date_nodash}*
    GA_WALS_WINDOW_DAYS   pipeline.run --window_days (default 1)
    GA_WALS_PROJECT, GA_WALS_REGION, GA_WALS_TEMP_LOCATION   Dataflow project, region, gs:// temp
    GA_WALS_REPO          the repository on the workers (default: the checkout holding this file)
    GA_WALS_RUN_PY        path of pipeline/run.py (default: GA_WALS_REPO/pipeline/run.py)
    GA_WALS_SETUP_FILE    setup.py shipped to Dataflow workers (default: GA_WALS_REPO/setup.py)
    GA_WALS_PYTHON        interpreter that has the project installed (default python3)
    GA_WALS_RETRIES       task retries (default 2), GA_WALS_RETRY_DELAY_MIN (default 10)
    GA_WALS_TRAIN_FLAGS   trainer flags for the train task, as "--flag value" pairs,
                          e.g. "--latent_factors 64 --regularization 0.02"
"""

from __future__ import annotations

import datetime
import os
import shlex

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.google.cloud.operators.dataflow import (
    CheckJobRunning,
    DataflowConfiguration,
)
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

# The repository (with setup.py and pipeline/run.py) as the workers see it; by default the one
# this file lies in (pipeline/dags/ of a checkout).
REPO = os.environ.get(
    "GA_WALS_REPO", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)

SCHEDULE = os.environ.get("GA_WALS_SCHEDULE", "0 21 * * *")
ROOT = os.environ.get("GA_WALS_ROOT", "gs://my-bucket/ga-wals")
INPUT = os.environ.get("GA_WALS_INPUT", "gs://my-bucket/ga360/ga_sessions_{date_nodash}*")
WINDOW_DAYS = os.environ.get("GA_WALS_WINDOW_DAYS", "1")
PROJECT = os.environ.get("GA_WALS_PROJECT", "my-project")
REGION = os.environ.get("GA_WALS_REGION", "us-central1")
TEMP_LOCATION = os.environ.get("GA_WALS_TEMP_LOCATION", "gs://my-bucket/tmp")
RUN_PY = os.environ.get("GA_WALS_RUN_PY", os.path.join(REPO, "pipeline", "run.py"))
SETUP_FILE = os.environ.get("GA_WALS_SETUP_FILE", os.path.join(REPO, "setup.py"))
PYTHON = os.environ.get("GA_WALS_PYTHON", "python3")
RETRIES = int(os.environ.get("GA_WALS_RETRIES", "2"))
RETRY_DELAY = datetime.timedelta(minutes=int(os.environ.get("GA_WALS_RETRY_DELAY_MIN", "10")))
_TRAIN_FLAGS = shlex.split(os.environ.get("GA_WALS_TRAIN_FLAGS", ""))
TRAIN_OPTIONS = {f.lstrip("-"): v for f, v in zip(_TRAIN_FLAGS[::2], _TRAIN_FLAGS[1::2])}

# pipeline.run's own flags, the same for every task; {{ ds }} is the run's logical date.
RUN_OPTIONS = {
    "date": "{{ ds }}",
    "root": ROOT,
    "input": INPUT,
    "window_days": WINDOW_DAYS,
}


def _beam_stage(
    stage: str, distributed: bool, extra: dict | None = None
) -> BeamRunPythonPipelineOperator:
    options = {
        **RUN_OPTIONS,
        **(extra or {}),
        "stages": stage,
        "temp_location": TEMP_LOCATION,
        "setup_file": SETUP_FILE,
    }
    if distributed:
        options["distributed"] = True
    return BeamRunPythonPipelineOperator(
        task_id=stage,
        py_file=RUN_PY,
        py_interpreter=PYTHON,
        py_options=[],
        runner="DataflowRunner",
        pipeline_options=options,
        dataflow_config=DataflowConfiguration(
            job_name=f"ga-wals-{stage}-{{{{ ds_nodash }}}}",
            append_job_name=False,
            project_id=PROJECT,
            location=REGION,
            check_if_running=CheckJobRunning.WaitForRun,
        ),
    )


def _local_stage(stage: str, dataflow: bool = False, extra: dict | None = None) -> BashOperator:
    """A stage run by `python -m pipeline.run` on the Airflow worker; with `dataflow`, its Beam
    jobs (the gate's scoring) run on Dataflow, named ga-wals-<stage>-<date>."""
    options = {**RUN_OPTIONS, **(extra or {})}
    if dataflow:
        options.update(
            runner="DataflowRunner",
            project=PROJECT,
            region=REGION,
            temp_location=TEMP_LOCATION,
            setup_file=SETUP_FILE,
            job_name=f"ga-wals-{stage}-{{{{ ds_nodash }}}}",
        )
    flags = " ".join(f"--{name} {shlex.quote(value)}" for name, value in options.items())
    if dataflow:
        flags += " --distributed"
    return BashOperator(
        task_id=stage,
        bash_command=f"{PYTHON} -m pipeline.run {flags} --stages {stage}",
        cwd=REPO,
    )


with DAG(
    dag_id="ga_wals_daily",
    description="GA360 sessions -> TF Transform -> WALS: preprocess, train, gate, predict, "
    "export, publish",
    schedule=SCHEDULE,
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": RETRIES, "retry_delay": RETRY_DELAY},
    tags=["ga-wals"],
) as dag:
    preprocess = _beam_stage("preprocess", distributed=False)
    train = _beam_stage("train", distributed=True, extra=TRAIN_OPTIONS)
    gate = _local_stage("gate", dataflow=True)
    predict = _beam_stage("predict", distributed=True)
    export = _local_stage("export", extra=TRAIN_OPTIONS)
    publish = _local_stage("publish", dataflow=True)
    preprocess >> train >> gate >> predict >> export >> publish
