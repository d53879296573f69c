"""What a client sends the Batch API, checked before anything is stored or queued: the input
file's requests (``parse_requests``) and a batch's ``metadata`` (``check_metadata``), each
problem a 400 that names the line or the field.

Usage::

    from lmref.production.batch_input import check_metadata, parse_requests

    requests = parse_requests(content, "/v1/chat/completions", file_id, limit=50_000)
    check_metadata({"job_time_limit_s": "60"}, server_limit_s=300.0)
"""

from __future__ import annotations

import json

from lmref.serving.schema import APIError

# OpenAI's limits on a batch's metadata: 16 pairs, keys up to 64 characters, string values up
# to 512.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_request")


def parse_requests(content: bytes, endpoint: str, file_id: str, limit: int) -> list[dict]:
    """The input file's requests; a bad line is a 400 naming the line and the field."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{file_id} is not UTF-8 text", "input_file_id") from None
    requests, seen = [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{file_id} line {number}"
        try:
            item = json.loads(raw)
        except ValueError:
            raise bad_request(f"{where} is not valid JSON", "input_file_id") from None
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be a JSON object", "input_file_id")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise bad_request(f"{where}: 'custom_id' must be a non-empty string", "input_file_id")
        if custom_id in seen:
            raise bad_request(f"{where}: 'custom_id' {custom_id!r} is used twice", "input_file_id")
        seen.add(custom_id)
        if item.get("method", "POST") != "POST":
            raise bad_request(f"{where}: 'method' must be POST", "input_file_id")
        if item.get("url") != endpoint:
            raise bad_request(
                f"{where}: 'url' is {item.get('url')!r}, but the batch's endpoint is {endpoint!r}",
                "input_file_id",
            )
        if not isinstance(item.get("body"), dict):
            raise bad_request(f"{where}: 'body' must be a JSON object", "input_file_id")
        if item["body"].get("stream"):
            raise bad_request(f"{where}: 'stream' is not allowed in a batch", "input_file_id")
        requests.append(item)
    if not requests:
        raise bad_request(f"{file_id} holds no requests", "input_file_id")
    if len(requests) > limit:
        raise bad_request(
            f"{file_id} holds {len(requests)} requests; at most {limit}", "input_file_id"
        )
    return requests


def check_metadata(metadata: object, server_limit_s: float) -> dict | None:
    """``metadata`` as OpenAI allows it (up to 16 string pairs, keys up to 64 characters, values
    up to 512), or a 400. Its ``job_time_limit_s`` may lower each request's time limit below the
    server's ``server_limit_s``, never raise it."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise bad_request("'metadata' must be an object of string keys and values", "metadata")
    if len(metadata) > METADATA_PAIRS:
        raise bad_request(
            f"'metadata' has {len(metadata)} pairs; at most {METADATA_PAIRS}", "metadata"
        )
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS:
            raise bad_request(
                f"'metadata' key {key[:20]!r}... has {len(key)} characters; at most "
                f"{METADATA_KEY_CHARS}",
                "metadata",
            )
        if not isinstance(value, str):
            raise bad_request(f"'metadata' value of {key!r} must be a string", "metadata")
        if len(value) > METADATA_VALUE_CHARS:
            raise bad_request(
                f"'metadata' value of {key!r} has {len(value)} characters; at most "
                f"{METADATA_VALUE_CHARS}",
                "metadata",
            )
    if "job_time_limit_s" in metadata:
        try:
            limit = float(metadata["job_time_limit_s"])
        except ValueError:
            limit = -1.0
        if not 0 < limit <= server_limit_s:
            raise bad_request(
                f"metadata 'job_time_limit_s' must be seconds in (0, {server_limit_s:g}] (the "
                f"server's limit); got {metadata['job_time_limit_s']!r}",
                "metadata",
            )
    return metadata
