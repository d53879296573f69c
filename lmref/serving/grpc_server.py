"""The model server over gRPC: the KServe v2 / Triton protocol (``inference.GRPCInferenceService``)
on the same ``ServingState`` as the HTTP app (engines, keys, drain flag), so that
``tritonclient.grpc.InferenceServerClient`` works unchanged, plus gRPC health and reflection.

Inputs follow Triton's vLLM backend: a BYTES ``text_input`` (one prompt, or several for a unary
call), optional ``stream`` and ``exclude_input_in_output`` (BOOL) and ``sampling_parameters``
(a BYTES JSON object: ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``); the same
settings may come as request ``parameters`` or as one-element tensors (``max_tokens`` INT32,
``temperature`` FP32 ..., the TensorRT-LLM names). The output is BYTES ``text_output``: like the
vLLM backend, the prompt and the completion unless ``exclude_input_in_output``. Over
``ModelStreamInfer`` one response per generated chunk (deltas), the last one with the parameter
``triton_final_response`` = true (``stream`` false there: one whole response).

The key is the metadata ``authorization: Bearer KEY``; errors are gRPC status codes with the
message the HTTP server would give (400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND,
429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE). ``lmref.serving.server`` starts it beside waitress
when ``ServingConfig.grpc_port`` is set (``python -m lmref.serve --grpc-port 0``).

Usage::

    from lmref.serving.grpc_server import GrpcServer

    grpc_server = GrpcServer(state, "127.0.0.1", 0)      # state: a started ServingState
    port = grpc_server.start()
    # tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{port}").infer("smollm2", [...])
    grpc_server.stop(grace=5)
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lmref import __version__
from lmref.serving.auth import Principal
from lmref.serving.engine import Delta, Failed, Finished
from lmref.serving.grpc_gen import grpc_service_pb2 as pb
from lmref.serving.grpc_gen import grpc_service_pb2_grpc as pb_grpc
from lmref.serving.grpc_tensors import TensorError, bytes_output, read_inputs
from lmref.serving.schema import APIError
from lmref.serving.service import collect, counted, first_admission, submit
from lmref.serving.shaping import api_error_of
from lmref.serving.state import ServingState, model_not_found

log = logging.getLogger("lmref.serving.grpc")
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
}
SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "stop")  # what may set sampling
FLAGS = ("stream", "exclude_input_in_output")
# sampling_parameters (JSON) may also carry what a tensor cannot hold; other keys are refused by
# name, not dropped (a dropped ignore_eos made a 16-token request stop at EOS, unnoticed).
SAMPLING_JSON = (*SAMPLING, "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias")


class Limits(Protocol):
    """A key's rate and token limits (``lmref.production.limits.Limiter`` is one)."""

    def check(self, who: Principal) -> tuple[str, int] | None: ...

    def charge(self, key_id: str, tokens_per_min: int | None, prompt: int, completion: int): ...


def _parameter(value: pb.InferParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def _one(name: str, values: list) -> Any:
    if len(values) != 1:
        raise TensorError(f"input '{name}' must hold one element, not {len(values)}")
    return values[0]


def shape_infer(request: pb.ModelInferRequest) -> tuple[dict, list[str], dict]:
    """An OpenAI completions body from an infer request, its prompts, and its flags
    (``stream``, ``exclude_input_in_output``); ``TensorError`` naming a bad input."""
    inputs = read_inputs(request)
    if "text_input" not in inputs:
        raise TensorError("input 'text_input' (BYTES, the prompt) is missing")
    try:
        prompts = [b.decode("utf-8") for b in inputs.pop("text_input")]
    except (UnicodeDecodeError, AttributeError):
        raise TensorError("input 'text_input' must be BYTES holding UTF-8 text") from None
    if not prompts:
        raise TensorError("input 'text_input' holds no prompt")
    given = {k: _parameter(v) for k, v in request.parameters.items() if k in SAMPLING + FLAGS}
    if "sampling_parameters" in inputs:
        try:
            extra = json.loads(_one("sampling_parameters", inputs.pop("sampling_parameters")))
        except (ValueError, UnicodeDecodeError):
            raise TensorError("input 'sampling_parameters' must be a JSON object") from None
        if not isinstance(extra, dict):
            raise TensorError("input 'sampling_parameters' must be a JSON object")
        unknown = sorted(set(extra) - set(SAMPLING_JSON))
        if unknown:
            raise TensorError(
                f"sampling_parameters: unknown {', '.join(unknown)} (known: {', '.join(SAMPLING_JSON)})"
            )
        given.update(extra)
    for name, values in inputs.items():
        if name not in SAMPLING + FLAGS:
            raise TensorError(
                f"unknown input '{name}' (known: text_input, {', '.join(SAMPLING + FLAGS)}, sampling_parameters)"
            )
        given[name] = _one(name, values)
    flags = {k: bool(given.pop(k, False)) for k in FLAGS}
    body = {
        "model": request.model_name or None,
        "prompt": prompts if len(prompts) > 1 else prompts[0],
        **given,
    }
    return body, prompts, flags


def _infer_response(
    engine_name: str, request_id: str, texts: list[str], **params
) -> pb.ModelInferResponse:
    tensor, raw = bytes_output("text_output", texts)
    response = pb.ModelInferResponse(
        model_name=engine_name, model_version="1", id=request_id, outputs=[tensor]
    )
    response.raw_output_contents.append(raw)
    for key, value in params.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(response.parameters[key], kind, value)
    return response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's calls over one ``ServingState``; the others stay UNIMPLEMENTED."""

    def __init__(self, state: ServingState, limiter: Limits | None = None):
        self.state, self.limiter = state, limiter

    # -- what every call passes: key, drain flag, limits
    def _admit(self, context: grpc.ServicerContext) -> Principal:
        metadata = dict(context.invocation_metadata())
        principal = self.state.authenticate(metadata.get("authorization"))
        if principal is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "Incorrect or missing API key (metadata authorization: Bearer <key>)",
            )
        if not principal.may("inference"):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this key lacks the 'inference' scope")
        if self.state.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if self.limiter is not None:
            try:
                refused = self.limiter.check(principal)
            except Exception:  # the key store is down: fail closed, as the HTTP guard does
                log.exception("limit check failed")
                context.abort(grpc.StatusCode.UNAVAILABLE, "the key store is unavailable")
            if refused:
                code, wait = refused
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{code}: retry after {wait} s")
        return principal

    def _charge(self, who: Principal, prompt: int, completion: int) -> None:
        if self.limiter is not None:
            try:
                self.limiter.charge(who.key_id, who.tokens_per_min, prompt, completion)
            except Exception as exc:  # the answer is out: nothing left to refuse
                log.warning("usage of %s not charged: %s", who.key_id, exc)

    def _engine(self, name: str, context: grpc.ServicerContext):
        try:
            return self.state.resolve(name or None, None)
        except APIError as err:
            context.abort(CODES.get(err.status, grpc.StatusCode.INTERNAL), err.message)

    # -- health and metadata
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready)

    def ModelReady(self, request, context):
        name = request.name or self.state.default_model
        if name not in self.state.engines and name not in self.state.config.aliases:
            context.abort(grpc.StatusCode.NOT_FOUND, model_not_found(name).message)
        versions = self.state.config.aliases.get(name) or [name]
        ready = all(self.state.engines[v].ready for v in versions)
        return pb.ModelReadyResponse(ready=ready and not self.state.draining.is_set())

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="lmref", version=__version__, extensions=[])

    def ModelMetadata(self, request, context):
        engine = self._engine(request.name, context)
        T = pb.ModelMetadataResponse.TensorMetadata  # noqa: N806 (the protocol's type)
        return pb.ModelMetadataResponse(
            name=engine.spec.name,
            versions=["1"],
            platform="lmref",
            inputs=[
                T(name="text_input", datatype="BYTES", shape=[-1]),
                T(name="stream", datatype="BOOL", shape=[1]),
                T(name="exclude_input_in_output", datatype="BOOL", shape=[1]),
                T(name="sampling_parameters", datatype="BYTES", shape=[1]),
                T(name="max_tokens", datatype="INT32", shape=[1]),
                T(name="temperature", datatype="FP32", shape=[1]),
            ],
            outputs=[T(name="text_output", datatype="BYTES", shape=[-1])],
        )

    # -- inference
    def ModelInfer(self, request, context):
        who = self._admit(context)
        self.state.enter()
        try:
            return self._infer(request, context, who)
        except (APIError, TensorError) as err:
            status = err.status if isinstance(err, APIError) else 400
            context.abort(
                CODES.get(status, grpc.StatusCode.INTERNAL), str(getattr(err, "message", err))
            )
        finally:
            self.state.leave()

    def _infer(self, request, context, who: Principal) -> pb.ModelInferResponse:
        body, prompts, flags = shape_infer(request)
        rid = request.id or uuid.uuid4().hex
        engine, job, _ = submit(self.state, body, False, who.owner, rid)
        choices, usage = collect(engine, job, lambda: not context.is_active())
        self._charge(who, usage["prompt_tokens"], usage["completion_tokens"])
        lead = [""] * len(prompts) if flags["exclude_input_in_output"] else prompts
        texts = [lead[c.index] + c.text for c in choices]
        return _infer_response(engine.spec.name, request.id, texts, finish_reason=choices[0].reason)

    def ModelStreamInfer(self, request_iterator, context):
        who = self._admit(context)
        for request in request_iterator:
            self.state.enter()
            try:
                yield from self._stream_one(request, context, who)
            except (APIError, TensorError) as err:  # this request failed; the stream goes on
                message = err.message if isinstance(err, APIError) else str(err)
                yield pb.ModelStreamInferResponse(error_message=message)
            finally:
                self.state.leave()

    def _stream_one(
        self, request, context, who: Principal
    ) -> Iterator[pb.ModelStreamInferResponse]:
        body, prompts, flags = shape_infer(request)
        if len(prompts) != 1:
            raise TensorError("a streamed request holds one prompt in 'text_input'")
        stream = flags["stream"] or "stream" not in _given_flags(request)
        rid = request.id or uuid.uuid4().hex
        engine, job, _ = submit(self.state, {**body, "stream": stream}, False, who.owner, rid)
        name, lead = (
            engine.spec.name,
            "" if flags["exclude_input_in_output"] or stream else prompts[0],
        )
        source = counted(engine, engine.events(job, lambda: not context.is_active()))
        held: str | None = None  # a chunk is sent when the next comes: the last carries the flag
        buffered = first_admission(source)
        for event in itertools.chain(buffered, source):
            if isinstance(event, Failed):
                raise api_error_of(event.error)
            if isinstance(event, Delta):
                if held is not None:
                    yield pb.ModelStreamInferResponse(
                        infer_response=_infer_response(
                            name, request.id, [held], triton_final_response=False
                        )
                    )
                held = event.text
            elif isinstance(event, Finished):
                self._charge(who, event.prompt_tokens, event.completion_tokens)
                text = (held or "") if stream and not event.cached else lead + event.text
                yield pb.ModelStreamInferResponse(
                    infer_response=_infer_response(
                        name,
                        request.id,
                        [text],
                        triton_final_response=True,
                        finish_reason=event.reason,
                    )
                )
                return


def _given_flags(request) -> set[str]:
    return {t.name for t in request.inputs} | set(request.parameters)


class GrpcServer:
    """The gRPC server of one ``ServingState``: the inference service, health and reflection."""

    def __init__(
        self,
        state: ServingState,
        host: str,
        port: int,
        workers: int = 16,
        limiter: Limits | None = None,
    ):
        self.state, self.host, self.requested_port = state, host, port
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc")
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(state, limiter), self.server
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = 0
        self._stop = threading.Event()

    def start(self) -> int:
        """Listen (port 0: a free one) and return the port; health follows readiness."""
        self.port = self.server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if not self.port:
            raise OSError(f"gRPC could not listen on {self.host}:{self.requested_port}")
        self.server.start()
        threading.Thread(target=self._follow, name="grpc-health", daemon=True).start()
        return self.port

    def _follow(self) -> None:
        """NOT_SERVING until the models are loaded and again once draining (polled: the state
        has no callbacks, and a fifth of a second is soon enough for a probe)."""
        last = None
        while not self._stop.wait(0.2):
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if self.state.ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            if status != last:
                for name in ("", SERVICE):
                    self.health.set(name, status)
                last = status

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, give running ones ``grace`` seconds, then close."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)
