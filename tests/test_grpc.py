"""The KServe v2 / Triton gRPC protocol on a real server (127.0.0.1): ``tritonclient.grpc``
unchanged against the conftest's tiny Llama, the same answers as HTTP, keys, errors, health."""

from __future__ import annotations

import json
import queue

import grpc
import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.utils import InferenceServerException

from lmref.serve import start_server
from lmref.serving.app import ModelSpec, ServingConfig

pytestmark = pytest.mark.integration  # a server on 127.0.0.1

KEY = "sk-grpc-test"
AUTH = {"authorization": f"Bearer {KEY}"}
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = ServingConfig(
        models=[ModelSpec("tiny", str(tiny_model_dir))],
        api_keys=[KEY],
        cache_size=0,  # every answer generated: the stream and the unary call each run the model
        torch_threads=1,
        grpc_port=0,
    )
    handle = start_server(config)
    yield handle
    handle.stop(drain_timeout=5)


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.grpc_target)


def inputs(prompt=PROMPT, exclude=True, **sampling) -> list:
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    params = triton.InferInput("sampling_parameters", [1], "BYTES")
    settings = {"max_tokens": 12, "temperature": 0, **sampling}
    params.set_data_from_numpy(np.array([json.dumps(settings).encode()], dtype=object))
    flag = triton.InferInput("exclude_input_in_output", [1], "BOOL")
    flag.set_data_from_numpy(np.array([exclude]))
    return [text, params, flag]


@pytest.fixture(scope="module")
def http_text(server):
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    return (
        api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
        .choices[0]
        .text
    )


def test_unary_infer_equals_the_http_completion(client, http_text):
    result = client.infer("tiny", inputs(), headers=AUTH)
    assert result.as_numpy("text_output")[0].decode() == http_text
    assert result.get_response().parameters["finish_reason"].string_param in ("stop", "length")
    # Triton's vLLM backend: the prompt and the completion unless exclude_input_in_output.
    whole = client.infer("tiny", inputs(exclude=False), headers=AUTH)
    assert whole.as_numpy("text_output")[0].decode() == PROMPT + http_text


def test_stream_chunks_concatenate_to_the_same_text(client, http_text):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=AUTH)
    try:
        client.async_stream_infer("tiny", inputs(), enable_empty_final_response=True)
        chunks, final = [], False
        while not final:
            result, error = results.get(timeout=60)
            assert error is None, error
            chunks.append(result.as_numpy("text_output")[0].decode())
            final = result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
    assert len(chunks) > 1, "one response per generated chunk"
    assert "".join(chunks) == http_text


def test_health_liveness_readiness_and_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.get_server_metadata().name == "lmref"
    meta = client.get_model_metadata("tiny", headers=AUTH)
    assert meta.inputs[0].name == "text_input" and meta.inputs[0].datatype == "BYTES"
    assert [o.name for o in meta.outputs] == ["text_output"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "inference.GRPCInferenceService" in services and "grpc.health.v1.Health" in services


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer sk-wrong"}])
def test_a_call_without_a_valid_key_is_refused(client, headers):
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", inputs(), headers=headers)
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "API key" in err.value.message()


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("no-such-model", inputs(), headers=AUTH)
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.is_model_ready("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_bad_tensors_are_invalid_arguments_that_name_them(client):
    wrong_type = triton.InferInput("text_input", [1], "INT32")
    wrong_type.set_data_from_numpy(np.array([7], dtype=np.int32))
    missing = triton.InferInput("stream", [1], "BOOL")
    missing.set_data_from_numpy(np.array([False]))
    cases = [
        ([wrong_type], "text_input"),
        ([missing], "text_input"),
        (inputs(temperature=-1), "temperature"),
        (inputs(max_tokens="many"), "max_tokens"),
        (inputs(top_k=5), "top_k"),  # a key it does not know is named, not dropped
    ]
    for given, named in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer("tiny", given, headers=AUTH)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
        assert named in err.value.message()


def test_a_bad_request_in_a_stream_fails_alone(client, http_text):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=AUTH)
    try:
        client.async_stream_infer("tiny", inputs(temperature=-1))
        result, error = results.get(timeout=60)
        assert result is None and "temperature" in str(error)
        client.async_stream_infer("tiny", inputs(), enable_empty_final_response=True)
        text, final = "", False
        while not final:
            result, error = results.get(timeout=60)
            assert error is None, error
            text += result.as_numpy("text_output")[0].decode()
            final = result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
    assert text == http_text


def test_sampling_parameters_carry_what_http_takes(client, server):
    """ignore_eos (and the penalties) reach the engine: 12 tokens generated, as over HTTP."""
    out = client.infer("tiny", inputs(ignore_eos=True, frequency_penalty=0.5), headers=AUTH)
    text = out.as_numpy("text_output")[0].decode()
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    body |= {"ignore_eos": True, "frequency_penalty": 0.5}
    reply = requests.post(
        server.url + "/v1/completions", json=body, headers=AUTH, timeout=60
    ).json()
    assert reply["usage"]["completion_tokens"] == 12 and text == reply["choices"][0]["text"]
