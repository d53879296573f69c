"""KServe v2 tensors to and from Python values: the inputs of a ``ModelInferRequest`` (raw bytes
or typed ``contents``) and the BYTES output of a ``ModelInferResponse``, as Triton lays them out.

Written here on numpy rather than taken from ``tritonclient.utils``: that is the client library,
and the server should not need it. BYTES elements travel as a 4-byte little-endian length, then
the bytes (Triton's ``serialize_byte_tensor``).

Usage::

    from lmref.serving.grpc_tensors import TensorError, bytes_output, read_inputs

    values = read_inputs(request)      # {"text_input": ["hi"], "max_tokens": [8]}; TensorError
    response.outputs.append(bytes_output("text_output", ["hello"])[0])   # tensor, raw bytes
"""

from __future__ import annotations

import struct

import numpy as np

from lmref.serving.grpc_gen import grpc_service_pb2 as pb

# KServe v2 datatype -> numpy dtype (little-endian, as the protocol's raw contents are).
DTYPES = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The typed `contents` field that holds each datatype when raw contents are not used.
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class TensorError(ValueError):
    """A malformed input tensor; the message names it (the server answers INVALID_ARGUMENT)."""


def _count(tensor) -> int:
    if any(d < 0 for d in tensor.shape):
        raise TensorError(f"input '{tensor.name}': shape {list(tensor.shape)} has a negative size")
    return int(np.prod(tensor.shape, dtype=np.int64)) if tensor.shape else 1


def _split_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise TensorError(f"input '{name}': BYTES element {len(items)} has a cut length prefix")
        (size,) = struct.unpack_from("<I", raw, at)
        if at + 4 + size > len(raw):
            raise TensorError(f"input '{name}': BYTES element {len(items)} runs past the data")
        items.append(raw[at + 4 : at + 4 + size])
        at += 4 + size
    if len(items) != count:
        raise TensorError(
            f"input '{name}': shape says {count} elements, the data holds {len(items)}"
        )
    return items


def _values(tensor, raw: bytes | None) -> list:
    count, kind = _count(tensor), tensor.datatype
    if kind != "BYTES" and kind not in DTYPES:
        raise TensorError(f"input '{tensor.name}': unknown datatype {kind!r}")
    if raw is not None:
        if kind == "BYTES":
            return _split_bytes(tensor.name, raw, count)
        dtype = DTYPES[kind]
        if len(raw) != count * dtype.itemsize:
            raise TensorError(
                f"input '{tensor.name}': {len(raw)} bytes for {count} {kind} elements"
            )
        return np.frombuffer(raw, dtype).tolist()
    if kind not in CONTENTS:
        raise TensorError(f"input '{tensor.name}': {kind} needs raw_input_contents")
    values = list(getattr(tensor.contents, CONTENTS[kind]))
    if len(values) != count:
        raise TensorError(
            f"input '{tensor.name}': shape says {count} elements, contents hold {len(values)}"
        )
    return values


def read_inputs(request) -> dict[str, list]:
    """Each input's name -> its elements (BYTES: ``bytes``), flattened; ``TensorError`` naming
    the tensor for a wrong shape, datatype or size."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    out: dict[str, list] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise TensorError(f"input '{tensor.name}' is given twice")
        out[tensor.name] = _values(tensor, raw[i] if raw else None)
    return out


def bytes_output(
    name: str, texts: list[str]
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """A BYTES output tensor of shape [len(texts)] and its raw contents."""
    tensor = pb.ModelInferResponse.InferOutputTensor(
        name=name, datatype="BYTES", shape=[len(texts)]
    )
    raw = b"".join(struct.pack("<I", len(b)) + b for b in (t.encode("utf-8") for t in texts))
    return tensor, raw
