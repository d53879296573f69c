"""From sampled tokens to a job's events: EOS, stop strings, token limits, stream deltas, results.

The engine's worker hands every sampled token of a row to ``OutputProcessor.append`` (vLLM calls
its counterpart the output processor): it records the logprob entry, updates the latency and
token metrics, ends the row on EOS / a stop string / ``max_tokens``, and puts on the job's queue a
``Delta`` with the new text that is safe to stream (``lmref.serving.detokenizer`` decides which)
and, at the end, the row's ``Finished`` (stored in the response cache when the row is greedy).
It needs a tokenizer and the metrics only, so it runs without a model.

Usage::

    from lmref.serving.outputs import OutputProcessor

    out = OutputProcessor(tokenizer, eos_ids={2}, metrics=EngineMetrics(), model_name="base",
                          cache=ResponseCache(0))
    if out.append(request, token, time.perf_counter()):   # True: the request is done
        ...                                               # its Finished is on request.job.events
"""

from __future__ import annotations

from lmref.serving.echo import echo_delta, prompt_text
from lmref.serving.metrics import EngineMetrics
from lmref.serving.request import Delta, EngineError, Failed, Finished, Request, RequestStatus
from lmref.serving.response_cache import ResponseCache
from lmref.serving.sampler import TokenLogprob, reported


class OutputProcessor:
    """Turns one model version's sampled tokens into its requests' events."""

    def __init__(
        self,
        tokenizer,
        eos_ids: frozenset[int] | set[int],
        metrics: EngineMetrics,
        model_name: str,
        cache: ResponseCache,
    ) -> None:
        self.tokenizer, self.eos_ids, self.cache = tokenizer, eos_ids, cache
        self.metrics, self._labels = metrics, {"model_name": model_name}
        # Labelled children looked up once: they are touched for every token.
        self._ttft = metrics.ttft.labels(**self._labels)
        self._itl = metrics.itl.labels(**self._labels)
        self._generated = metrics.generation_tokens.labels(**self._labels)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def append(
        self, row: Request, token: int, now: float, entry: TokenLogprob | None = None
    ) -> bool:
        """Add one token to a row; returns True when the row is finished."""
        text = row.text_stream
        if entry is not None:
            row.logprobs.append(entry)
            row.starts.append(text.settled if text is not None else 0)
        if row.completion_tokens == 0:
            self._ttft.observe(now - row.job.arrival)
            echo_delta(row, self.decode)  # a stream's echo: the prompt before the first token
        else:
            self._itl.observe(now - row.last_token_at)
        row.last_token_at = now
        row.completion_tokens += 1
        self._generated.inc()
        if token in self.eos_ids and not row.params.ignore_eos:
            self.finish(row, "stop", now)
            return True
        row.out_ids.append(token)
        if text is not None:
            stop_at = text.push(token)  # where a stop string starts in the text, or None
            if stop_at is not None:
                row.text = text.text[:stop_at]
                self.finish(row, "stop", now, decoded=True)
                return True
            if row.job.stream and (new := text.take_safe()):  # a possible stop start waits
                sent, row.logprobs_sent = row.logprobs_sent, reported(row.starts, text.sent)
                row.job.events.put(
                    Delta(row.index, new, tuple(row.logprobs[sent : row.logprobs_sent]))
                )
                row.emitted = text.sent
        if row.completion_tokens >= row.max_tokens:
            self.finish(row, "length", now)
            return True
        return False

    def finish(
        self,
        row: Request,
        reason: str,
        now: float,
        decoded: bool = False,
        closing: str | None = None,
    ) -> None:
        """End a row: "stop", "length" (a ``Finished`` event) or "abort" (with ``closing``, the
        engine's shutdown message, a ``Failed`` event unless the client itself went away).
        ``decoded``: ``row.text`` was already cut at a stop string."""
        labels = self._labels
        if not decoded:  # once a row: what was streamed is a prefix of this decode
            row.text = self.decode(row.out_ids)
        else:  # a stop string cut the text: tokens starting after the cut are not the answer's
            del row.logprobs[reported(row.starts, len(row.text)) :]
        if reason == "abort":
            row.move(RequestStatus.ABORTED)
            self.metrics.request_success.labels(finished_reason="abort", **labels).inc()
            if closing and not row.job.cancelled.is_set():
                row.job.events.put(Failed(EngineError("closed", closing, code="shutting_down")))
            return
        row.move(RequestStatus.FINISHED)
        if row.completion_tokens == 0:  # echo with max_tokens 0: no token came to send it
            echo_delta(row, self.decode)
        if row.job.stream and (
            len(row.text) > row.emitted or len(row.logprobs) > row.logprobs_sent
        ):
            row.job.events.put(
                Delta(row.index, row.text[row.emitted :], tuple(row.logprobs[row.logprobs_sent :]))
            )
            row.emitted, row.logprobs_sent = len(row.text), len(row.logprobs)
        self.metrics.request_success.labels(finished_reason=reason, **labels).inc()
        self.metrics.e2e_latency.labels(**labels).observe(now - row.job.arrival)
        p = row.params
        result = Finished(
            row.index,
            row.text,
            reason,
            len(row.prompt_ids),
            row.completion_tokens,
            logprobs=None if p.logprobs is None else tuple(row.logprobs),
            prompt_logprobs=None if row.prompt_logprobs is None else tuple(row.prompt_logprobs),
            prompt_text=prompt_text(row, self.decode) if p.echo else "",
        )
        if row.cache_key is not None:
            self.cache.put(row.cache_key, result)
        row.job.events.put(result)
