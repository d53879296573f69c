"""The model registry on MLflow: register a saved model folder as a version, move aliases
(``champion``, ``challenger``, ``previous``), tag versions, and resolve ``models:/`` URIs to a
local, verified folder that the one loader (``lmref.models.loading``) and the server load.

A version is a plain Hugging Face folder with its sha256 manifest (``lmref.core.manifest``),
logged as a run's ``model`` artifact; no MLmodel flavour is needed. Registering pins the
manifest's own sha256 as the version tag ``lmref.manifest_sha256``: a download is served only
when its files match its manifest *and* the manifest is the one registered, so a torn or
tampered download (or one whose manifest was rewritten with it) is refused, naming the file.

``fetch_model("models:/lmref-chat@champion")`` resolves the alias to a version once, then
downloads ``models:/lmref-chat/<version>`` into ``<cache>/lmref-chat/<version>/``: the cache is
keyed by version, never by alias (an alias moves; a version's files do not). A second resolve of
that version reuses the folder after verifying it. ``<cache>/<name>/<version>.json`` beside it
records which version it is (``registry_origin``): the server puts it in the model card.

The tracking server is ``MLFLOW_TRACKING_URI`` unless ``RegistryConfig.tracking_uri`` says;
the cache is ``LMREF_REGISTRY_CACHE`` or ``~/.cache/lmref/registry``. mlflow is imported inside
functions: it is an optional dependency (the ``tracking`` extra).

Usage::

    from lmref.models.registry import fetch_model, register_folder, register_run, set_alias

    version = register_folder("lmref-chat", "artifacts/full-ft")      # logs it in a new run
    version = register_run("lmref-chat", run.info.run_id)             # runs:/<id>/model
    set_alias("lmref-chat", "champion", version)
    folder = fetch_model("models:/lmref-chat@champion")               # downloaded, verified
    load_model("models:/lmref-chat@champion")                         # the same, by the loader
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmref.core.hashing import sha256_of
from lmref.core.manifest import MANIFEST, has_manifest, verify_manifest

SCHEME = "models:/"
MANIFEST_TAG = "lmref.manifest_sha256"  # the pinned sha256 of the version's manifest.json
ARTIFACT_PATH = "model"  # where a run holds the folder (the tracking part logs it there too)
EXPERIMENT = "lmref-registry"  # the experiment of runs made only to upload a local folder


class RegistryError(ValueError):
    """A registry request that cannot be met: the message names the model, version or file."""


@dataclass
class RegistryConfig:
    """Where the registry is and where downloaded versions are kept."""

    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI (mlflow reads it)
    cache_dir: str | None = None  # None: LMREF_REGISTRY_CACHE, else ~/.cache/lmref/registry

    def cache(self) -> Path:
        found = self.cache_dir or os.environ.get("LMREF_REGISTRY_CACHE")
        return Path(found or Path.home() / ".cache" / "lmref" / "registry")


def _client(config: RegistryConfig | None):
    from mlflow.tracking import MlflowClient

    config = config or RegistryConfig()
    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def is_registry_uri(name_or_path: object) -> bool:
    return str(name_or_path).startswith(SCHEME)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME/VERSION`` -> (name, version, None); ``models:/NAME@ALIAS`` -> (name,
    None, alias); anything else is a ``RegistryError`` saying what the forms are."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w.-]+))", str(uri))
    if not match:
        raise RegistryError(f"{uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
    return match.group(1), match.group(2), match.group(3)


def _version_of(name: str, version: str, client) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version(name, version).version)
    except MlflowException as exc:
        raise RegistryError(f"models:/{name}/{version}: no such version ({exc.message})") from exc


def resolve_version(uri: str, config: RegistryConfig | None = None) -> tuple[str, str]:
    """(name, version) a ``models:/`` URI names now (an alias is looked up, once)."""
    name, version, alias = parse_model_uri(uri)
    client = _client(config)
    if version is not None:
        return name, _version_of(name, version, client)
    found = alias_version(name, alias, config)
    if found is None:
        raise RegistryError(f"{uri}: model {name!r} has no alias {alias!r}")
    return name, found


def alias_version(name: str, alias: str, config: RegistryConfig | None = None) -> str | None:
    """The version ``alias`` points at, None when it points nowhere (or the model is unknown)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(config).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str, config: RegistryConfig | None = None) -> None:
    """Point ``alias`` at ``version`` (moving it if it pointed elsewhere)."""
    client = _client(config)
    client.set_registered_model_alias(name, alias, _version_of(name, str(version), client))


def tag_version(
    name: str, version: str, tags: dict[str, object], config: RegistryConfig | None = None
) -> None:
    """Set tags (values as strings) on one version."""
    client = _client(config)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def version_tags(name: str, version: str, config: RegistryConfig | None = None) -> dict[str, str]:
    return dict(_client(config).get_model_version(name, str(version)).tags)


def _create_version(name, source, run_id, manifest_sha, tags, client) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # registered already: versions are added to it
    made = client.create_model_version(
        name, source=source, run_id=run_id, tags={**(tags or {}), MANIFEST_TAG: manifest_sha}
    )
    return str(made.version)


def register_folder(
    name: str,
    folder: str | os.PathLike,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
    config: RegistryConfig | None = None,
) -> str:
    """Log ``folder`` (it must match its manifest) as the ``model`` artifact of ``run_id``, or
    of a new run in the ``lmref-registry`` experiment, and register it; returns the version."""
    folder = Path(folder)
    if not has_manifest(folder):
        raise RegistryError(f"{folder} has no {MANIFEST}: write it with lmref.core.manifest first")
    reason = verify_manifest(folder)
    if reason is not None:
        raise RegistryError(f"refusing to register {folder}: {reason}")
    client = _client(config)
    new_run = run_id is None
    if new_run:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
        )
        run_id = client.create_run(experiment_id, run_name=f"register-{name}").info.run_id
    client.log_artifacts(run_id, str(folder), ARTIFACT_PATH)
    if new_run:
        client.set_tag(run_id, "lmref.source_folder", str(folder.resolve()))
        client.set_terminated(run_id)
    source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"
    return _create_version(name, source, run_id, sha256_of(folder / MANIFEST), tags, client)


def register_run(
    name: str,
    run_id: str,
    artifact_path: str = ARTIFACT_PATH,
    tags: dict[str, str] | None = None,
    config: RegistryConfig | None = None,
) -> str:
    """Register the folder a run logged (``runs:/<run_id>/<artifact_path>``, with its manifest);
    returns the version. Only the manifest is downloaded here, to pin its sha256."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client = _client(config)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            manifest = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=f"{artifact_path}/{MANIFEST}",
                dst_path=tmp,
                tracking_uri=(config or RegistryConfig()).tracking_uri,
            )
        except (MlflowException, OSError) as exc:
            raise RegistryError(
                f"runs:/{run_id}/{artifact_path} has no readable {MANIFEST}: log a folder saved "
                f"with its manifest ({exc})"
            ) from exc
        manifest_sha = sha256_of(manifest)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return _create_version(name, source, run_id, manifest_sha, tags, client)


def _check(folder: Path, pinned: str | None, what: str) -> None:
    """Raise ``RegistryError`` unless ``folder`` matches its manifest and the manifest is the
    registered one."""
    reason = verify_manifest(folder)
    if reason is None and pinned and sha256_of(folder / MANIFEST) != pinned:
        reason = f"{folder / MANIFEST} is not the manifest registered ({MANIFEST_TAG} differs)"
    if reason is not None:
        raise RegistryError(f"refusing {what}: {reason}")


def fetch_model(uri: str, config: RegistryConfig | None = None) -> Path:
    """The local folder of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: downloaded once
    into the cache (keyed by name and version), verified against its manifest and the pinned
    manifest sha256 on every call; ``RegistryError`` naming the file when it does not match."""
    import mlflow.artifacts

    config = config or RegistryConfig()
    name, version = resolve_version(uri, config)
    what = f"models:/{name}/{version} (from {uri})"
    pinned = version_tags(name, version, config).get(MANIFEST_TAG)
    home = config.cache() / name
    folder = home / version
    if folder.is_dir():
        _check(folder, pinned, what)  # a cached copy edited since: refused like a download
        return folder
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=home))
    try:
        got = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}",
            dst_path=str(tmp),
            tracking_uri=config.tracking_uri,
        )
        _check(Path(got), pinned, what)
        origin = {"registered_model": name, "version": version, "manifest_sha256": pinned}
        (home / f"{version}.json").write_text(json.dumps(origin))
        try:
            os.rename(got, folder)  # atomic: a reader sees no folder or a whole one
        except OSError:
            if not folder.is_dir():  # else another process put the same version there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def registry_origin(folder: str | os.PathLike) -> dict | None:
    """What ``fetch_model`` recorded for a cached version folder (registered model, version,
    pinned manifest sha256), None for any other folder."""
    folder = Path(folder)
    sidecar = folder.parent / f"{folder.name}.json"
    try:
        origin = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return origin if isinstance(origin, dict) and "registered_model" in origin else None
