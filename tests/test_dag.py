"""The Airflow DAG in a real Airflow 3, installed in a virtualenv of its own.

Airflow's and its providers' pins need not agree with TensorFlow's, so this test creates a
virtualenv (cached under ~/.cache/ga-wals, keyed by the requirements file's hash; about 2.5
minutes the first time), installs pipeline/dags/requirements-airflow.txt there, and runs
tests/dag_inspect.py in it, which loads pipeline/dags with Airflow's DagBag and prints the
tasks, their order, the schedule and the retry settings as JSON. It skips only when the
package index cannot be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from local_services import CACHE, cached_venv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAGS = os.path.join(REPO, "pipeline", "dags")
REQUIREMENTS = os.path.join(DAGS, "requirements-airflow.txt")
INSPECT = os.path.join(REPO, "tests", "dag_inspect.py")
EXPECTED_ORDER = ["preprocess", "train", "gate", "predict", "export", "publish"]


@pytest.fixture(scope="module")
def described() -> dict:
    python = os.path.join(cached_venv("airflow-venv", REQUIREMENTS), "bin", "python")
    airflow_home = os.path.join(CACHE, "airflow-home")
    os.makedirs(airflow_home, exist_ok=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GA_WALS_", "AIRFLOW"))},
        "AIRFLOW_HOME": airflow_home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "GA_WALS_ROOT": "gs://test-bucket/ga-wals",
        "GA_WALS_RETRIES": "3",
        "GA_WALS_TRAIN_FLAGS": "--export_k 25 --serving_model fold_in",
    }
    result = subprocess.run(
        [python, INSPECT, DAGS], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON in the output:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_dag_folder_imports_without_errors(described):
    assert described["import_errors"] == {}
    assert list(described["dags"]) == ["ga_wals_daily"]


def test_schedule_catchup_and_concurrency(described):
    dag = described["dags"]["ga_wals_daily"]
    assert dag["schedule"] == "0 21 * * *"
    assert dag["catchup"] is False
    assert dag["max_active_runs"] == 1


def test_tasks_run_in_stage_order_with_retries(described):
    dag = described["dags"]["ga_wals_daily"]
    tasks = dag["tasks"]
    assert dag["order"] == EXPECTED_ORDER
    for upstream, task in zip(EXPECTED_ORDER, EXPECTED_ORDER[1:]):
        assert tasks[task]["upstream"] == [upstream]
    assert tasks["preprocess"]["upstream"] == []
    assert {name: t["retries"] for name, t in tasks.items()} == dict.fromkeys(EXPECTED_ORDER, 3)
    assert all(t["retry_delay_s"] == 600 for t in tasks.values())


def test_beam_stages_run_on_dataflow_with_dated_job_names(described):
    tasks = described["dags"]["ga_wals_daily"]["tasks"]
    for stage in ("preprocess", "train", "predict"):
        task = tasks[stage]
        assert task["type"] == "BeamRunPythonPipelineOperator"
        assert task["runner"] == "DataflowRunner"
        assert task["job_name"] == f"ga-wals-{stage}-{{{{ ds_nodash }}}}"
        assert task["append_job_name"] is False  # a retry must find its own job
        assert task["check_if_running"] == "WaitForRun"
        options = task["pipeline_options"]
        assert options["stages"] == stage
        assert options["date"] == "{{ ds }}"
        assert options["root"] == "gs://test-bucket/ga-wals"
    assert tasks["train"]["pipeline_options"]["distributed"] is True
    assert tasks["predict"]["pipeline_options"]["distributed"] is True


def test_gate_and_publish_are_tasks_of_their_own(described):
    tasks = described["dags"]["ga_wals_daily"]["tasks"]
    for stage in ("gate", "export", "publish"):
        command = tasks[stage]["bash_command"]
        assert "-m pipeline.run" in command
        assert command.endswith(f"--stages {stage}")
        assert "--date '{{ ds }}'" in command
    # The gate's scoring (and publish's, when it judges again) runs on Dataflow, not on the
    # Airflow worker; export serves what the train task exported, so it copies that SavedModel.
    for stage in ("gate", "publish"):
        command = tasks[stage]["bash_command"]
        assert " --distributed " in command
        assert "--runner DataflowRunner" in command
        assert f"--job_name 'ga-wals-{stage}-{{{{ ds_nodash }}}}'" in command
        assert "--temp_location gs://my-bucket/tmp" in command
    export = tasks["export"]["bash_command"]
    assert "--distributed" not in export and "--runner" not in export
    assert "--export_k 25" in export and "--serving_model fold_in" in export
    train = tasks["train"]["pipeline_options"]
    assert train["export_k"] == "25" and train["serving_model"] == "fold_in"


def test_the_dag_runs_the_project_entry_point():
    """The Beam tasks run pipeline/run.py as a script: it must exist and accept --stages."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "pipeline", "run.py"), "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--stages" in result.stdout
