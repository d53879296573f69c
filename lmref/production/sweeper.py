"""The Batch API's sweeper: no batch stays unfinished with nothing left to run.

Workers make delivery at-least-once and results exactly-once; the sweeper closes what remains:
a batch whose messages are gone while some of its requests have no result (a failure recorded
nowhere, a message lost by a broker without persistence, a worker that could not write its
failure). It reconciles each live batch from the store and the queue:

- its counts are refreshed, and a batch with every result is completed (``Store.finalize``);
- a batch ``cancelling`` whose running request lost its worker ends ``cancelled`` after
  ``stall_s``;
- a batch still ``validating`` long after its creation never had all its messages queued (its
  replica died mid-create, or its broker and store failed together): it is failed, saying so;
- an ``in_progress`` batch with no worker activity for ``BatchConfig.stall_s`` while the queue
  holds no message has lost requests: they are queued again from the input file, up to
  ``max_requeues`` times, then failed as ``request_lost`` so the batch completes.

``lost`` in each report counts the requests failed that way: zero unless something lost work.
Every replica runs a sweeper thread (``start``); a Redis lock lets one sweep at a time.

Usage::

    sweeper = Sweeper(store, config, queue_depth=lambda: 0, requeue=send)
    report = sweeper.sweep()        # SweepReport(completed=[...], failed=[...], requeued={}, lost=0)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmref.production.batch_input import parse_requests
from lmref.production.celery_app import BatchConfig
from lmref.production.connections import STORE_ERRORS
from lmref.production.store import Store, failure_line

log = logging.getLogger("lmref.production.sweeper")
VALIDATING_GRACE_S = 120.0  # a create that has not queued its messages after this never will


@dataclass
class SweepReport:
    """What one sweep did."""

    completed: list[str] = field(default_factory=list)  # batches it found finished
    failed: list[str] = field(default_factory=list)  # batches whose create never finished
    requeued: dict[str, int] = field(default_factory=dict)  # batch -> requests queued again
    lost: int = 0  # requests failed because nothing could run them again


class Sweeper:
    """Reconciles live batches; ``queue_depth()``: messages waiting in the queue (None when
    unknown); ``requeue(batch, requests)``: queue those requests of that batch again."""

    def __init__(
        self,
        store: Store,
        config: BatchConfig,
        queue_depth: Callable[[], int | None],
        requeue: Callable[[dict, list[dict]], None],
    ):
        self.store, self.config = store, config
        self.queue_depth, self.requeue = queue_depth, requeue

    def sweep(self, now: float | None = None, stall_s: float | None = None) -> SweepReport:
        """One pass over the live batches (``now``, ``stall_s``: for tests and notebooks)."""
        now = time.time() if now is None else now
        stall_s = self.config.stall_s if stall_s is None else stall_s
        report = SweepReport()
        depth: int | None = -1  # read once, when first needed
        for batch_id in self.store.live_batch_ids():
            batch = self.store.finalize(batch_id)
            if batch is None:  # expired
                self.store.forget(batch_id)
                continue
            if batch["status"] == "completed":
                report.completed.append(batch_id)
            elif batch["status"] == "validating" and now - batch["created_at"] > VALIDATING_GRACE_S:
                self._fail_unqueued(batch, now)
                report.failed.append(batch_id)
            elif batch["status"] == "cancelling":
                # A request still marked running after stall_s lost its worker: end the cancel.
                active = self.store.last_activity(batch_id) or batch["cancelling_at"]
                if now - active >= stall_s and self.store.finalize(batch_id, force=True):
                    report.completed.append(batch_id)
            elif batch["status"] == "in_progress":
                active = self.store.last_activity(batch_id) or batch["in_progress_at"]
                if now - active < stall_s:
                    continue
                if depth == -1:
                    depth = self.queue_depth()
                if depth != 0:  # messages waiting (or unknown): they may be this batch's
                    continue
                self._recover(batch, report)
        return report

    def _fail_unqueued(self, batch: dict, now: float) -> None:
        self.store.fail_batch(
            batch["id"],
            "enqueue_incomplete",
            "the batch's requests were not all queued (its server stopped, or the queue was "
            "unavailable); create it again",
            now,
        )
        log.warning("batch %s failed: its create did not finish queueing", batch["id"])

    def _recover(self, batch: dict, report: SweepReport) -> None:
        """Queue the batch's requests that have no result again, or fail them as lost."""
        batch_id = batch["id"]
        done = self.store.done_ids(batch_id)
        content = self.store.batch_input(batch_id, batch["input_file_id"])
        if content:
            requests = parse_requests(content, batch["endpoint"], batch["input_file_id"], 10**9)
        else:  # stored before batches kept a copy, and its input file deleted: nothing to rerun
            requests = [{"custom_id": c} for c in self.store.order(batch_id)]
        missing = [r for r in requests if r["custom_id"] not in done]
        requeues = self.store.requeues(batch_id)
        if missing and content and requeues < self.config.max_requeues:
            self.requeue(batch, missing)
            self.store.requeued(batch_id)
            self.store.touch(batch_id)
            report.requeued[batch_id] = len(missing)
            log.warning(
                "batch %s: %d requests had no message left; queued again", batch_id, len(missing)
            )
            return
        for r in missing:
            message = (
                f"no result after the batch was queued {requeues + 1} times and its queue "
                "emptied: the request was lost"
            )
            if self.store.record(
                batch_id, r["custom_id"], failure_line(r["custom_id"], "request_lost", message)
            ):
                report.lost += 1
        if self.store.finalize(batch_id)["status"] == "completed":
            report.completed.append(batch_id)

    def start(self, interval_s: float, stop: threading.Event) -> threading.Thread:
        """Sweep every ``interval_s`` in a daemon thread until ``stop`` is set; one replica at
        a time (a lock in Redis that expires, so a replica that died mid-sweep is replaced)."""

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    if not self.store.lock("sweep", int(interval_s) + 30):
                        continue  # another replica sweeps
                    try:
                        report = self.sweep()
                    finally:
                        self.store.unlock("sweep")
                    if report.requeued or report.lost or report.failed:
                        log.warning("sweep: %s", report)
                except STORE_ERRORS as exc:  # the store is down: the next sweep tries again
                    log.info("sweep skipped, store unavailable: %s", exc)
                except Exception:
                    log.exception("sweep failed")

        thread = threading.Thread(target=loop, name="lmref-batch-sweeper", daemon=True)
        thread.start()
        return thread
