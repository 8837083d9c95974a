"""On-disk cache of auto-policy decisions, so calibration runs once per model and settings.

One JSON file per key under ``envs.cache_dir()``. The key hashes everything a decision depends on: the
model's identity (resolved path, config.json content, weight file names/sizes/mtimes and any safetensors
index; or hub id, revision and the cached snapshot's config), the plugin version and the calibration
settings (prompt text hash, budget, candidates). JSON only, written atomically (temp file + os.replace);
a file that does not parse, belongs to another key or schema, or names an unknown policy is ignored and
the decision recomputed. ``locked(key)`` is an exclusive file lock so ranks or processes that start
together wait for one calibration instead of each running their own.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from .. import __version__, envs
from .layer_map import parse_policy_map

logger = logging.getLogger(__name__)

SCHEMA = 2  # 2: the decision is a policy map, its evidence holds the per-layer search
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model: str, revision: str | None = None) -> dict:
    """What names these exact weights: changes whenever the config or any weight file changes."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path.resolve()
        files = sorted(p for p in path.iterdir() if p.is_file())
        weights = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files
                   if p.name.endswith(_WEIGHT_SUFFIXES)]
        indexes = {p.name: _sha256_file(p) for p in files if p.name.endswith(".index.json")}
        return {"path": str(path), "revision": revision, "config_sha256": _sha256_file(path / "config.json"),
                "weights": weights, "indexes": indexes}
    identity = {"hub_id": model, "revision": revision}
    try:  # the snapshot already downloaded pins the commit; without one the id and revision are all we know
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - identity is best effort beyond id + revision
        config = None
    if isinstance(config, str):
        identity.update(snapshot=str(Path(config).resolve().parent),
                        config_sha256=_sha256_file(Path(config)))
    return identity


def make_key(identity: dict, calibration: dict) -> str:
    blob = json.dumps({"schema": SCHEMA, "plugin": __version__, "model": identity,
                       "calibration": calibration}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _file(key: str, directory: Path | None) -> Path:
    return (directory or envs.cache_dir()) / f"decision-{key[:40]}.json"


def load(key: str, directory: Path | None = None) -> dict | None:
    """The stored record for ``key``, or None when absent or not trustworthy."""
    path = _file(key, directory)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("schema") != SCHEMA or record.get("key") != key:
            raise ValueError("written for another key or schema")
        parse_policy_map(record["decision"]["policy"])
        if not isinstance(record["decision"].get("evidence"), dict):
            raise ValueError("no evidence")
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("ignoring unusable decision cache file %s (%s); recalibrating", path, err)
        return None


def store(key: str, record: dict, directory: Path | None = None) -> Path:
    """Write ``record`` atomically under ``key``; readers see the old file or the new one, never half."""
    path = _file(key, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({**record, "schema": SCHEMA, "key": key}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def locked(key: str, directory: Path | None = None):
    """Hold an exclusive lock for ``key`` (blocks while another process holds it).

    If the cache directory cannot be written, runs unlocked: every process then calibrates on its own,
    which is slower but still correct.
    """
    lock_path = _file(key, directory).with_suffix(".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")
    except OSError as err:
        logger.warning("decision cache %s not writable (%s): calibrating without a lock", lock_path, err)
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
