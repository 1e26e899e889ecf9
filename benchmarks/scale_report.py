"""The scale benchmark's comparison of two sizes, its verdict and its tables (`benchmarks.scale`).

    result = compare(small, big, flags, launcher_limit_mb=64, runner="local portable")
    print(format_report(result))

where small and big are `scale.run_size`'s results and flags `worker_bounds.job_terms`'s.

Growth per 8x of a process in a stage is its peak at 8S minus its peak at S (the sizes are 8x
apart). The verdict:

    launcher  the whole run's launcher peak grows by less than `launcher_limit_mb`
    workers   each Beam job's worker grows by no more than its flags allow, plus what the
              runner makes it hold (`benchmarks.worker_bounds.allowed_growth`), printed apart

The job service's growth is printed and not judged: the local portable runner holds every
PCollection between fused stages in it (README, "What the local portable runner holds").
"""

from __future__ import annotations

from benchmarks import worker_bounds
from benchmarks.process_memory import WHOLE_RUN, WORKER

LABELS = ("launcher", "job service", "worker pool", WORKER)


def worker_checks(small: dict, big: dict, flags: dict, runner: str | None = None) -> list[dict]:
    """One check per Beam job of each stage run at both sizes: its worker's peak at S and 8S,
    the growth, and the growth its flags allow (`worker_bounds.allowed_growth`).

    The k-th worker a stage started runs its k-th job (`worker_bounds.JOBS`); when a stage
    started another number of workers (a retry, a changed stage), its largest worker peaks are
    compared against the most any of its jobs may grow.
    """
    checks = []
    for stage, jobs in worker_bounds.JOBS.items():
        if stage not in small["stages"] or stage not in big["stages"]:
            continue
        a, b = small["stages"][stage]["workers"], big["stages"][stage]["workers"]
        if not a or not b:
            continue
        allowances = [
            worker_bounds.allowed_growth(job, small["shape"], big["shape"], flags, runner)
            for job in jobs
        ]
        if len(a) == len(b) == len(jobs):
            pairs = [(allowances[i], a[i]["peak_mb"], b[i]["peak_mb"]) for i in range(len(jobs))]
        else:
            most = max(allowances, key=lambda allowance: allowance["allowed_mb"])
            pairs = [(most, max(w["peak_mb"] for w in a), max(w["peak_mb"] for w in b))]
        for allowance, before, after in pairs:
            growth = after - before
            checks.append(
                {
                    "stage": stage,
                    **allowance,
                    "peak_mb": [before, after],
                    "growth_mb": growth,
                    "passed": growth <= allowance["allowed_mb"],
                    # Whether the job's own terms and the slack cover the growth, the runner's
                    # part left out.
                    "within_flags_alone": growth
                    <= allowance["allowed_mb"] - sum(allowance["runner_mb"].values()),
                }
            )
    return checks


def compare(
    small: dict, big: dict, flags: dict, launcher_limit_mb: float, runner: str | None = None
) -> dict:
    """Growth per stage and process, and the verdict; returns {"sizes": [small, big], "flags",
    "growth_mb": {stage: {label: MB}}, "launcher": {...}, "workers": {"checks", "passed"}}.
    `runner`: where the sizes ran (`worker_bounds.runner_terms`)."""
    growth = {}
    for stage, entry in big["stages"].items():
        if stage not in small["stages"]:
            continue
        before = small["stages"][stage]["peak_mb"]
        growth[stage] = {
            label: entry["peak_mb"][label] - before[label]
            for label in LABELS
            if label in entry["peak_mb"] and label in before
        }
    launcher_growth = growth.get(WHOLE_RUN, {}).get("launcher")
    checks = worker_checks(small, big, flags, runner)
    return {
        "sizes": [small, big],
        "flags": flags,
        "growth_mb": growth,
        "launcher": {
            "growth_mb": launcher_growth,
            "limit_mb": launcher_limit_mb,
            "passed": launcher_growth is not None and launcher_growth < launcher_limit_mb,
        },
        "workers": {
            "checks": checks,
            "passed": bool(checks) and all(check["passed"] for check in checks),
        },
    }


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _shape_line(size: dict) -> str:
    shape, asked = size["shape"], size["requested"]
    return (
        f"{size['label']:>3}: {asked['sessions']:,} sessions ({asked['visitors']:,} visitors, "
        f"{asked['items']:,} items asked) -> {shape['nusers']:,} users x {shape['nitems']:,} "
        f"items, {shape['train_interactions']:,} training cells; {size['seconds']:.0f} s"
    )


def _allowance_text(check: dict) -> str:
    terms = " + ".join(f"{name} {mb:+.1f}" for name, mb in check["terms_mb"].items())
    text = f"slack {check['slack_mb']:.0f} + {terms}"
    held = check.get("runner_mb") or {}
    if held:
        text += "; the runner's: " + " + ".join(f"{n} {mb:+.1f}" for n, mb in held.items())
    return text


def _row(label: str, values: list[float | None], growth: float | None, target: str) -> str:
    cells = " ".join(f"{v:>8.0f}" if v is not None else f"{'-':>8}" for v in values)
    grew = f"{growth:>+10.0f}" if growth is not None else f"{'-':>10}"
    return f"  {label:<20} {cells} {grew}  {target}".rstrip()


def stage_table(result: dict, stage: str) -> str:
    """One stage's table: peak MB per process at S and 8S, growth per 8x, the targets."""
    small, big = result["sizes"]
    a, b = small["stages"][stage], big["stages"][stage]
    growth = result["growth_mb"].get(stage, {})
    lines = [
        f"{stage}: {small['label']} {a['seconds']:.1f} s, {big['label']} {b['seconds']:.1f} s",
        f"  {'process':<20} {small['label'] + ' MB':>8} {big['label'] + ' MB':>8} "
        f"{'growth/8x':>10}  target",
    ]
    limit = result["launcher"]["limit_mb"]
    checks = [check for check in result["workers"]["checks"] if check["stage"] == stage]
    for label in LABELS:
        values = [a["peak_mb"].get(label), b["peak_mb"].get(label)]
        if values == [None, None] or label == WORKER and checks:
            continue  # a stage's workers have a row each
        target = "not judged: the runner's buffers" if label == "job service" else ""
        if label == "launcher":
            target = f"< +{limit:.0f}"
            if label in growth:
                target += f": {_verdict(growth[label] < limit)}"
        lines.append(_row(label, values, growth.get(label), target))
    for check in checks:
        target = f"<= {check['allowed_mb']:+.0f}: {_verdict(check['passed'])}"
        name = f"{WORKER} ({check['job']})"
        lines.append(_row(name, check["peak_mb"], check["growth_mb"], target))
    if a["workers"] or b["workers"]:
        lines.append(f"  {'workers started':<20} {len(a['workers']):>8} {len(b['workers']):>8}")
    for check in checks:
        lines.append(f"  allowed growth, {check['job']}: {_allowance_text(check)}")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The whole printout: the sizes, a table per stage (the whole run last), the verdict."""
    small, big = result["sizes"]
    ratios = ", ".join(
        f"x{big['shape'][key] / max(small['shape'][key], 1):.1f} {name}"
        for key, name in (
            ("nusers", "users"),
            ("nitems", "items"),
            ("train_interactions", "cells"),
        )
    )
    parts = [_shape_line(small), _shape_line(big), f"{big['label']} / {small['label']}: {ratios}"]
    for stage in big["stages"]:
        if stage in small["stages"]:
            parts.append(stage_table(result, stage))
    launcher, workers = result["launcher"], result["workers"]
    grew = launcher["growth_mb"]
    parts.append(
        f"launcher: the whole run's peak grows by "
        f"{'?' if grew is None else f'{grew:+.0f}'} MB per 8x (target < "
        f"{launcher['limit_mb']:.0f} MB): {_verdict(launcher['passed'])}"
    )
    held = [c for c in workers["checks"] if c.get("runner_mb")]
    if held:
        text = ", ".join(
            f"{c['stage']}/{c['job']} {sum(c['runner_mb'].values()):+.0f} MB (its growth "
            f"{'within' if c['within_flags_alone'] else 'past'} what its flags alone allow)"
            for c in held
        )
        parts.append(
            f"the runner's part of the allowances (the local portable runner hands a stage its "
            f"grouped input whole): {text}"
        )
    missed = [check for check in workers["checks"] if not check["passed"]]
    if missed:
        text = "; ".join(
            f"{c['stage']}/{c['job']} {c['growth_mb']:+.0f} > {c['allowed_mb']:+.0f} MB"
            for c in missed
        )
        parts.append(f"workers: grown past what their flags allow: {text}: FAIL")
    else:
        parts.append(
            f"workers: {len(workers['checks'])} of {len(workers['checks'])} within what their "
            f"flags allow: {_verdict(workers['passed'])}"
        )
    return "\n\n".join(parts)
