"""One scheduled run: preprocess, train, gate, predict, export and publish one date's data.

    python -m pipeline.run --date 2026-11-22 --input 'gs://b/ga360/ga_sessions_{date_nodash}*' \\
        --root /srv/ga-wals [any trainer.task flag] [--distributed] [Beam pipeline options]

Everything goes under ROOT/runs/DATE/ (layout in `pipeline.runstate`):

    preprocessed/        pipeline.preprocess --output_dir     (complete: summary.json)
    train/               trainer.task --output_dir            (complete: metrics.json)
    gate.json            trainer.evaluation.gate's decision              (written atomically)
    predictions.tsv      trainer.batch_predict --output       (a directory with --distributed)
    serving/YYYYMMDD/    the SavedModel, a TensorFlow Serving version directory
    run.json             status, timings, counts, metrics and the gate's decision

and a passing run points ROOT/published at runs/DATE. Each stage runs the project's own entry
point in this process (`pipeline.preprocess.run`, `trainer.task.run`, ...), so a failure stops
the run with that entry point's own exception. A stage is skipped when run.json says it is done
and its output is there; once one stage runs, every later one runs too; --force redoes all.

Exit status: 0 published (or already published), 1 rejected by the gate or a stage failed,
2 a bad flag or no input for the date, 75 another launch of the date holds its lock.

The package, by what each module holds:

    flags.py     the run's own flags and constants; splitting the rest among the stages
    inputs.py    the input patterns of the date's window
    stages.py    `Run`: one date's paths, its run.json record and its six stages
    launch.py    `run` and `main`: checks the flags, takes the date's lock, maps outcomes
                 to exit statuses

`python -m pipeline.run` (pipeline/run.py) is the command; nothing imports this package but
that entry point and the tests: the scheduled run is the composition root.
"""
