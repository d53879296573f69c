"""Suite-wide bounds and timings for ``make test`` (tests/ and the notebooks under nbval).

- Every test item has a time limit (pytest-timeout, ``timeout`` in pyproject.toml). When it runs
  out, the report first shows what each child process of the test run was doing (a torchrun
  rank, a notebook kernel, a server: ``lmref.core.processes.stack_report``), then pytest-timeout dumps
  this process's threads and fails the test, so a hang names its own cause and the suite goes on.
- At the end, the time spent per phase (the unit tests, each notebook) is printed, so a run that
  grows slower shows where, with the CPU time that anything but the notebook's kernel used
  meanwhile (this process's threads, stray children of earlier tests): a notebook competes with
  that for the machine's two cores.
"""

from __future__ import annotations

import collections
import os
import signal
import threading

import psutil
import pytest

# pytester: tests/test_conventions.py runs pytest on a made-up test file to check the marker rule.
pytest_plugins = ["pytester"]

_ENVIRONMENT_AT_START = dict(os.environ)
_phase_seconds: collections.Counter[str] = collections.Counter()
_cpu_beside_kernel: collections.Counter[str] = collections.Counter()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's signal method, with the children's stacks added to the report."""
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own implementation takes over
    import pytest_timeout

    from lmref.core.processes import stack_report

    def on_timeout(signum, frame):
        __tracebackhide__ = True
        terminal = item.config.get_terminal_writer()
        terminal.sep("+", title=f"Timeout after {settings.timeout:.0f} s: child processes")
        terminal.line(stack_report(os.getpid(), include_root=False))
        pytest_timeout.timeout_sigalrm(item, settings)  # this process's threads, then fail

    def cancel():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # pytest-timeout's cancel hook calls it
    signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


def _phase(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return path if path.endswith(".ipynb") else "unit and integration tests (tests/)"


def _cpu_seconds_beside_kernel() -> float:
    """CPU time of this process and of its children other than Jupyter kernels."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            if "ipykernel" not in " ".join(child.cmdline()):
                total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


_thread_cpu: collections.Counter[int] = (
    collections.Counter()
)  # this process's threads, in notebooks


def _thread_seconds() -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    phase = _phase(item.nodeid)
    if not phase.endswith(".ipynb"):
        yield
        return
    before, threads_before = _cpu_seconds_beside_kernel(), _thread_seconds()
    yield
    _cpu_beside_kernel[phase] += _cpu_seconds_beside_kernel() - before
    for tid, seconds in _thread_seconds().items():
        _thread_cpu[tid] += seconds - threads_before.get(tid, 0.0)


def pytest_runtest_logreport(report):
    _phase_seconds[_phase(report.nodeid)] += report.duration  # setup, call and teardown


def pytest_terminal_summary(terminalreporter):
    if not _phase_seconds:
        return
    terminalreporter.section("time per phase")
    setup = os.environ.get("LMREF_SETUP_SECONDS")  # measured by .ci/run around `make setup`
    if setup:
        terminalreporter.line(f"{float(setup):8.1f} s  setup (make setup)")
    for phase, seconds in _phase_seconds.items():
        beside = (
            f"  (CPU beside the kernel: {_cpu_beside_kernel[phase]:.1f} s)"
            if phase in _cpu_beside_kernel
            else ""
        )
        terminalreporter.line(f"{seconds:8.1f} s  {phase}{beside}")
    terminalreporter.line(f"{sum(_phase_seconds.values()):8.1f} s  pytest in all")
    if _thread_cpu:
        names = {t.native_id: t.name for t in threading.enumerate()}
        busiest = ", ".join(
            f"{names.get(tid, tid)}: {seconds:.1f} s" for tid, seconds in _thread_cpu.most_common(4)
        )
        terminalreporter.line(
            f"CPU of this process's busiest threads during the notebooks: {busiest}"
        )
    # What later children (torchrun jobs, notebook kernels) inherit that the session did not start
    # with: a test that leaks a variable changes every process started after it. Names only.
    changed = sorted(
        k
        for k in {**_ENVIRONMENT_AT_START, **os.environ}
        if os.environ.get(k) != _ENVIRONMENT_AT_START.get(k)
    )
    terminalreporter.line(f"environment variables changed during the run: {changed or 'none'}")
