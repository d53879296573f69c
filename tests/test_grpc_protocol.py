"""The committed KServe v2 / Triton protocol files: what regenerating them gives, and the very
descriptors the installed tritonclient carries (so both live in one process without a clash)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmref.serving.grpc_gen import grpc_service_pb2, model_config_pb2, regenerate

pytestmark = pytest.mark.unit


def test_regenerating_gives_the_committed_files(tmp_path):
    regenerate.main(["--out", str(tmp_path)])
    made = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert made, "nothing was generated"
    for name in made:
        committed = Path(regenerate.HERE, name).read_text()
        assert (tmp_path / name).read_text() == committed, f"{name} differs: regenerate it"


def test_the_descriptors_are_tritonclients_byte_for_byte():
    from tritonclient.grpc import model_config_pb2 as theirs_config
    from tritonclient.grpc import service_pb2 as theirs

    assert grpc_service_pb2.DESCRIPTOR.serialized_pb == theirs.DESCRIPTOR.serialized_pb
    assert model_config_pb2.DESCRIPTOR.serialized_pb == theirs_config.DESCRIPTOR.serialized_pb
