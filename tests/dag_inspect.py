"""Prints, as JSON, what Airflow makes of the DAG folder: import errors, and for each DAG its
schedule, catchup, max_active_runs and tasks (type, upstream, retries, job settings).

    AIRFLOW_HOME=/tmp/af python tests/dag_inspect.py pipeline/dags

Run with an interpreter that has pipeline/dags/requirements-airflow.txt installed
(tests/test_dag.py does). The JSON is the last line of the output.
"""

from __future__ import annotations

import json
import sys


def describe(folder: str) -> dict:
    from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=folder, include_examples=False)
    dags = {}
    for dag_id, dag in bag.dags.items():
        tasks = {}
        for task in dag.tasks:
            entry = {
                "type": type(task).__name__,
                "upstream": sorted(task.upstream_task_ids),
                "retries": task.retries,
                "retry_delay_s": task.retry_delay.total_seconds(),
            }
            config = getattr(task, "dataflow_config", None)
            if config is not None:
                entry["job_name"] = config.job_name
                entry["append_job_name"] = config.append_job_name
                entry["check_if_running"] = config.check_if_running.name
                entry["runner"] = task.runner
                entry["pipeline_options"] = task.pipeline_options
            if hasattr(task, "bash_command"):
                entry["bash_command"] = task.bash_command
            tasks[task.task_id] = entry
        dags[dag_id] = {
            "schedule": str(dag.timetable.summary),
            "catchup": dag.catchup,
            "max_active_runs": dag.max_active_runs,
            "order": [t.task_id for t in dag.topological_sort()]
            if hasattr(dag, "topological_sort")
            else None,
            "tasks": tasks,
        }
    return {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": dags}


if __name__ == "__main__":
    print(json.dumps(describe(sys.argv[1]), default=str))
