"""lmref.tuning: a SIGKILLed study resumes from its storage, two worker processes share one study,
grids fit the budget, pruning stops bad trials, a resume with another setup is refused.

Worker processes are real ``python -m lmref.tuning`` processes on a real journal file; the
objective is a cheap function in a module written to tmp_path (no model: the point is the
bookkeeping), which logs every call so the test can count what really ran.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lmref import tuning
from lmref.core.stats import Spread
from lmref.tuning import Param, StudyConfig

ROOT = Path(__file__).resolve().parent.parent

OBJECTIVE = textwrap.dedent("""
    import json, os, sys, time
    from lmref.tuning import Param, suggest

    SPACE = [Param("x", -5.0, 5.0), Param("k", choices=(1, 2, 3))]

    def make_objective(log, sleep=0.0):
        def objective(trial):
            params = suggest(trial, SPACE)
            time.sleep(sleep)
            with open(log, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "number": trial.number,
                                    "params": params}) + "\\n")
            return (params["x"] - 1.0) ** 2 + params["k"]
        return objective

    def make_chatty_objective(folder, peers=2, chars=1_500_000, wait=60.0):
        # Prints `chars` to stderr, then waits until `peers` workers have printed theirs.
        def objective(trial):
            params = suggest(trial, SPACE)
            for _ in range(chars // 1024):
                print("x" * 1023, file=sys.stderr)
            open(os.path.join(folder, str(os.getpid())), "w").close()
            deadline = time.time() + wait
            while len(os.listdir(folder)) < peers:
                if time.time() > deadline:
                    raise RuntimeError("the other worker never finished printing")
                time.sleep(0.05)
            return params["x"]
        return objective
""")


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_objective.py").write_text(OBJECTIVE)
    env = {
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, env


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def complete_trials(config: StudyConfig) -> list:
    study = optuna.load_study(study_name=config.name, storage=tuning.open_storage(config.storage))
    return study.get_trials(states=(TrialState.COMPLETE,))


@pytest.mark.integration
def test_killed_study_resumes_from_storage(toy):
    tmp_path, env = toy
    log = tmp_path / "calls.jsonl"
    config = StudyConfig("resume", str(tmp_path / "study.journal"), sampler="random", n_trials=8)
    cmd = tuning.worker_command(
        config,
        "toy_objective:SPACE",
        "toy_objective:make_objective",
        {"log": str(log), "sleep": 0.3},
    )
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    deadline = time.time() + 40
    while len(calls(log)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # inside the next trial's sleep: that trial is RUNNING when the kill lands
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = complete_trials(config)
    assert 3 <= len(done_before) < 8, "the kill must land mid-study"
    study = optuna.load_study(study_name="resume", storage=tuning.open_storage(config.storage))
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert len(running) == 1, "the trial being evaluated stays RUNNING in storage after a SIGKILL"

    calls_before = len(calls(log))
    objective = tuning.load_reference("toy_objective:make_objective")(log=str(log))
    study = tuning.run_study(objective, config, tuning.load_reference("toy_objective:SPACE"))

    after = {t.number: t for t in study.get_trials()}
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8
    assert after[running[0].number].state == TrialState.FAIL
    # The finished trials were kept as they were, not re-run: only the missing ones ran.
    for t in done_before:
        assert after[t.number].value == t.value and after[t.number].params == t.params
    assert len(calls(log)) - calls_before == 8 - len(done_before)
    retried = [t for t in after.values() if t.user_attrs.get("retry_of") == running[0].number]
    assert len(retried) == 1 and retried[0].params == running[0].params
    assert retried[0].state == TrialState.COMPLETE


@pytest.mark.integration
def test_two_worker_processes_share_one_study(toy):
    tmp_path, env = toy
    log = tmp_path / "calls.jsonl"
    config = StudyConfig(
        "shared", str(tmp_path / "shared.journal"), sampler="tpe", n_trials=12, n_startup_trials=3
    )
    result = tuning.run_workers(
        2,
        config,
        "toy_objective:SPACE",
        "toy_objective:make_objective",
        {"log": str(log), "sleep": 0.2},
        env=env,
        timeout=50,
    )
    study = optuna.load_study(study_name="shared", storage=tuning.open_storage(config.storage))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 12, "exactly the budget, all done"
    ran = calls(log)
    assert sorted(c["number"] for c in ran) == list(range(12)), "each trial ran once, none twice"
    pids = {c["pid"] for c in ran}
    assert len(pids) == 2, "both workers ran trials"
    worker_ids = {t.user_attrs["worker"]["worker_id"] for t in trials}
    assert worker_ids == {0, 1}
    # Different seeds per worker: no two trials drew the same point.
    assert len({json.dumps(c["params"], sort_keys=True) for c in ran}) == 12
    assert result["seconds"] > 0


@pytest.mark.integration
def test_workers_printing_more_than_a_pipe_holds_run_at_once(toy):
    # Each worker prints 1.5 MiB (a pipe holds 64 KiB), then waits for the other to finish
    # printing. Reading the pipes one at a time blocked worker 1 on its full pipe while worker 0
    # waited for it: worker 0 failed after its wait, and run_workers raised.
    tmp_path, env = toy
    folder = tmp_path / "printed"
    folder.mkdir()
    config = StudyConfig("chatty", str(tmp_path / "chatty.journal"), sampler="random", n_trials=2)
    result = tuning.run_workers(
        2,
        config,
        "toy_objective:SPACE",
        "toy_objective:make_chatty_objective",
        {"folder": str(folder)},
        env=env,
        timeout=180,
    )
    assert len(os.listdir(folder)) == 2
    for output in result["outputs"]:
        assert len(output) >= 1_400_000, "each worker's whole output comes back"
    ends = [json.loads(output.splitlines()[-1]) for output in result["outputs"]]
    assert [end["worker_id"] for end in ends] == [0, 1]
    trials = optuna.load_study(study_name="chatty", storage=tuning.open_storage(config.storage))
    assert [t.state for t in trials.get_trials()] == [TrialState.COMPLETE] * 2


@pytest.mark.unit
def test_grid_fits_budget_and_uses_cell_centres():
    space = [
        Param("lr", 1e-4, 1e-2, log=True),
        Param("warmup", 0, 10, integer=True),
        Param("r", choices=(4, 8, 16, 32)),
    ]
    grid = tuning.grid_points(space, 8)
    assert [len(v) for v in grid.values()] == [2, 2, 2]
    assert grid["lr"] == pytest.approx([10**-3.5, 10**-2.5], rel=1e-2)
    assert grid["warmup"] == [2, 8]
    assert grid["r"] == [8, 32]
    assert [len(v) for v in tuning.grid_points(space, 1).values()] == [1, 1, 1]
    assert tuning.grid_points(space, 1)["lr"] == pytest.approx([1e-3], rel=1e-2)
    with pytest.raises(ValueError, match="budget"):
        tuning.grid_points(space, 0)


@pytest.mark.unit
def test_grid_sampler_covers_the_grid_then_stops(tmp_path):
    space = [Param("x", 0.0, 4.0), Param("k", choices=("a", "b"))]
    config = StudyConfig("grid", str(tmp_path / "g.journal"), sampler="grid", n_trials=9)
    seen = []

    def objective(trial):
        params = tuning.suggest(trial, space)
        seen.append((params["x"], params["k"]))
        return params["x"]

    study = tuning.run_study(objective, config, space)
    # 9 allowed, but x gets 4 levels x k 2 levels = 8 points; the exhausted grid stops the study.
    assert sorted(seen) == sorted({(x, k) for x in (0.5, 1.5, 2.5, 3.5) for k in "ab"})
    assert len(study.trials) == 8
    assert tuning.best_so_far(study)[-1] == 0.5


def _median_pruned(storage, n_trials: int, min_resource: int, max_resource: int) -> StudyConfig:
    """A random-sampler study with the median pruner: the shape both pruning tests use."""
    return StudyConfig(
        "pruned",
        str(storage),
        sampler="random",
        n_trials=n_trials,
        pruner="median",
        min_resource=min_resource,
        max_resource=max_resource,
    )


@pytest.mark.unit
def test_pruning_callback_prunes_a_bad_trial(tmp_path):
    space = [Param("slope", 0.0, 1.0)]
    config = _median_pruned(tmp_path / "p.journal", n_trials=12, min_resource=2, max_resource=10)
    steps_run = []

    def objective(trial):
        slope = tuning.suggest(trial, space)["slope"]
        callback = tuning.pruning_callback(trial, "loss")
        for step in range(1, 11):  # a "training loop": the loss falls faster for larger slopes
            steps_run.append(step)
            callback(step, {"step": step, "loss": 10.0 - slope * step})
        return 10.0 - slope * 10

    study = tuning.run_study(objective, config, space)
    summary = tuning.summarize(study)
    assert summary["pruned"] >= 1 and summary["complete"] + summary["pruned"] == 12
    assert len(steps_run) < 12 * 10, "pruned trials stopped early"
    for t in study.get_trials(states=(TrialState.PRUNED,)):
        assert max(t.intermediate_values) < 10
    curve = tuning.best_so_far(study)
    assert len(curve) == 12 and all(a >= b for a, b in zip(curve, curve[1:]))


@pytest.mark.unit
def test_resume_with_another_setup_is_refused(tmp_path):
    space = [Param("x", 0.0, 1.0)]
    storage = str(tmp_path / "s.journal")
    tuning.run_study(
        lambda t: tuning.suggest(t, space)["x"],
        StudyConfig("s", storage, sampler="random", n_trials=2),
        space,
    )
    with pytest.raises(ValueError, match="sampler"):
        tuning.open_study(StudyConfig("s", storage, sampler="tpe", n_trials=2), space)
    with pytest.raises(ValueError, match="space"):
        tuning.open_study(StudyConfig("s", storage, sampler="random"), [Param("x", 0.0, 2.0)])


@pytest.mark.unit
def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="sampler"):
        StudyConfig("s", "x.journal", sampler="bayes")
    with pytest.raises(ValueError, match="pruner"):
        StudyConfig("s", "x.journal", pruner="asha")
    with pytest.raises(ValueError, match="lr"):
        Param("lr", 1e-2, 1e-4, log=True)
    with pytest.raises(ValueError, match="module:attribute"):
        tuning.load_reference("no_colon_here")


@pytest.mark.integration
def test_cli_worker_reports_json(toy):
    tmp_path, env = toy
    config = StudyConfig(
        "cli", str(tmp_path / "cli.journal"), sampler="gp", n_trials=5, n_startup_trials=2
    )
    cmd = tuning.worker_command(
        config,
        "toy_objective:SPACE",
        "toy_objective:make_objective",
        {"log": str(tmp_path / "c.jsonl")},
    )
    out = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=50, check=True
    ).stdout
    assert json.loads(out.strip().splitlines()[-1])["finished"] == 5
    assert sys.executable == cmd[0]


@pytest.mark.unit
def test_memoize_runs_each_setting_once_and_returns_the_same_value(tmp_path):
    space = [Param("k", choices=(1, 2, 3))]
    runs = []

    def objective(trial):
        k = tuning.suggest(trial, space)["k"]
        runs.append(k)
        return float(k * k)

    memoized = tuning.memoize(objective, space)
    studies = tuning.run_samplers(
        memoized, space, ("grid", "random"), (0, 1, 2), 3, str(tmp_path / "m.journal")
    )
    # 6 studies of 3 trials over 3 points: every point trained once, the rest looked up.
    assert sorted(runs) == [1, 2, 3]
    assert sorted(memoized.values.values()) == [1.0, 4.0, 9.0]
    for study in studies.values():
        for t in study.trials:
            assert t.value == t.params["k"] ** 2
    looked_up = [t for s in studies.values() for t in s.trials if t.user_attrs.get("memoized")]
    assert len(looked_up) == 6 * 3 - 3


@pytest.mark.unit
def test_curves_over_seeds_and_the_verdict(tmp_path):
    space = [Param("x", 0.0, 1.0)]
    studies = tuning.run_samplers(
        lambda t: tuning.suggest(t, space)["x"],
        space,
        ("random",),
        (0, 1, 2),
        5,
        str(tmp_path / "c.journal"),
    )
    seeds = [studies["random", s] for s in (0, 1, 2)]
    curve = tuning.curve_spreads(seeds, 7)  # 2 more than the budget: the last value carries on
    assert len(curve) == 7 and curve[-1] == curve[4]
    assert all(a.median >= b.median and a.low >= b.low for a, b in zip(curve, curve[1:]))
    final = tuning.final_spread(seeds)
    assert (final.low, final.high) == (
        min(s.best_value for s in seeds),
        max(s.best_value for s in seeds),
    )
    low, high = Spread.of([1.0, 1.1, 1.2]), Spread.of([2.0, 2.1, 2.2])
    assert tuning.compare_best(low, high, ("tpe", "random")) == "tpe better than random"
    assert tuning.compare_best(high, low, ("tpe", "random")) == "random better than tpe"
    assert tuning.compare_best(low, high, ("a", "b"), "maximize") == "b better than a"
    assert tuning.compare_best(low, Spread.of([1.1, 1.5, 2.0]), ("a", "b")) == "within noise"


@pytest.mark.unit
def test_report_prunes_on_the_reported_value(tmp_path):
    space = [Param("x", 0.0, 1.0)]
    config = _median_pruned(tmp_path / "r.journal", n_trials=6, min_resource=1, max_resource=4)
    study = tuning.open_study(config, space)
    for _ in range(3):  # three finished trials at 1.0 set the median
        trial = study.ask()
        tuning.report(trial, 1, 1.0)
        study.tell(trial, 1.0)
    better = study.ask()
    tuning.report(better, 1, 0.5)  # below the median: goes on
    worse = study.ask()
    with pytest.raises(optuna.TrialPruned, match=r"pruned at step 1 \(value 5.0000\)"):
        tuning.report(worse, 1, 5.0)


@pytest.mark.unit
def test_samplers_and_studies_log_nothing(tmp_path):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.addHandler(handler)
    level = optuna.logging.get_verbosity()
    space = [Param("x", 0.0, 1.0), Param("k", choices=(1, 2))]
    try:
        for sampler in tuning.SAMPLERS:
            config = StudyConfig(
                sampler,
                str(tmp_path / "q.journal"),
                sampler=sampler,
                n_trials=4,
                n_startup_trials=2,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # any warning, an ExperimentalWarning too, fails
                tuning.run_study(lambda t: tuning.suggest(t, space)["x"], config, space)
    finally:
        optuna_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [], "no study or trial lines, no greenlet notice"
    assert optuna.logging.get_verbosity() == level, "the level is restored"
