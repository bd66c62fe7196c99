"""The artifact store: the only way stages talk to each other.

Two backends behind one small interface: a local directory and ``s3://bucket/prefix`` (any S3-compatible
server: MinIO, SeaweedFS, AWS, GCS's S3 API). Keys are ``/``-separated and relative to the store root;
the layout is ``<run.id>/<stage>/...``. Writes are atomic: temp file + rename locally, one PUT on S3.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from pipeline.errors import ArtifactNotFound, StoreError

T = TypeVar("T")

SUCCESS = "_SUCCESS"


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(f"invalid store key {key!r}")
    return key


def _folder(prefix: str) -> str:
    if not prefix.endswith("/"):
        raise StoreError(f"invalid store folder {prefix!r} (a folder ends in '/')")
    return _check_key(prefix[:-1])


class ArtifactStore(ABC):
    uri: str
    # calls are quick local file operations: async code may make them on its event loop (see blocking())
    quick: bool = False

    # -- the backend contract ------------------------------------------------------------------
    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "", limit: int | None = None) -> Iterator[str]:
        """Keys under ``prefix`` (a folder-like prefix; ``""`` for all), in sorted order; the first ``limit``
        only when given (S3 lists only those: a LIST call per 1,000)."""

    @abstractmethod
    def children(self, prefix: str = "", limit: int | None = None) -> list[str]:
        """The keys one level below the folder ``prefix`` (``""`` or ending in ``/``), sorted, a folder as one
        key ending in ``/`` (on S3 a delimiter listing; SeaweedFS also lists a folder whose objects were all
        deleted); the first ``limit`` only when given (S3 lists only those)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object (no error when it is absent)."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist, atomically (of two writers exactly one wins); False when
        it exists."""

    @abstractmethod
    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Overwrite ``key`` only if it holds exactly ``expected`` now, atomically; False otherwise."""

    def ensure_pool(self, calls: int) -> None:
        """Be ready for ``calls`` store calls at once (threads); a local directory needs nothing."""

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(prefix))
        for key in keys:
            self.delete(key)
        return len(keys)

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    # -- helpers shared by both backends ---------------------------------------------------------
    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_json(self, key: str, obj: Any) -> None:
        self.put_text(key, json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=False) + "\n")

    def get_json(self, key: str) -> Any:
        try:
            return json.loads(self.get_bytes(key))
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.url(key)}: not valid JSON ({exc.msg} at line {exc.lineno})") from None

    def put_jsonl(self, key: str, rows: Iterable[dict[str, Any]]) -> None:
        self.put_text(key, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def get_jsonl(self, key: str) -> list[dict[str, Any]]:
        rows = []
        for n, line in enumerate(self.get_text(key).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise StoreError(f"{self.url(key)} line {n}: not valid JSON ({exc.msg})") from None
        return rows

    def upload_dir(self, local_dir: str | Path, prefix: str) -> int:
        """Copy every file below ``local_dir`` to ``prefix/<relative path>``; returns the file count."""
        root = Path(local_dir)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            self.put_bytes(f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}", path.read_bytes())
        return len(files)

    def download_dir(self, prefix: str, local_dir: str | Path) -> Path:
        """Copy every key under ``prefix`` into ``local_dir`` (mirroring the relative paths)."""
        root = Path(local_dir)
        base = prefix.rstrip("/") + "/"
        keys = list(self.list(base))
        if not keys:
            raise ArtifactNotFound(f"nothing stored under {self.url(base)}")
        for key in keys:
            target = root / key[len(base):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.get_bytes(key))
        return root


def _temp_copy(path: Path, data: bytes) -> str:
    """``data`` in a new temp file beside ``path``; removed again when a write fails (a full disk leaves no
    temp file behind)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileNotFoundError:  # a new folder (most writes go to an existing one: no mkdir each time)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


class LocalStore(ArtifactStore):
    quick = True

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            os.replace(_temp_copy(path, data), path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"not found in store: {path}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _walk(self, folder: Path) -> Iterator[str]:
        """The keys below ``folder`` in sorted order, read as they are needed (``a.json`` before ``a/x``)."""
        try:
            entries = sorted((e.name + "/" if e.is_dir() else e.name, e) for e in os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreError(f"cannot list {folder}: {exc.strerror}") from None
        for name, entry in entries:
            if name.endswith("/"):
                yield from self._walk(Path(entry))
            elif not name.endswith(".tmp"):
                yield Path(entry).relative_to(self.root).as_posix()

    def list(self, prefix: str = "", limit: int | None = None) -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        keys = self._walk(base if base.is_dir() else base.parent)
        return iter(list(itertools.islice((k for k in keys if k.startswith(prefix)), limit)))

    def children(self, prefix: str = "", limit: int | None = None) -> list[str]:
        base = self.root / _folder(prefix) if prefix else self.root
        try:
            entries = sorted(e.name + "/" if e.is_dir() else e.name for e in os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {base}: {exc.strerror}") from None
        objects = (prefix + name for name in entries  # as on S3: no temp files, no folder without an object
                   if not name.endswith(".tmp") and (not name.endswith("/") or any(self.list(prefix + name, 1))))
        return list(itertools.islice(objects, limit))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {self._path(key)}: {exc.strerror}") from None

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            tmp = _temp_copy(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None
        try:
            os.link(tmp, path)  # atomic, fails when the name exists: readers never see a partial file
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None
        finally:
            os.unlink(tmp)

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        import fcntl

        path = self._path(key)
        try:  # in place, under a lock on the file itself: contenders re-read what the winner wrote
            with path.open("r+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                if fh.read() != expected:
                    return False
                fh.seek(0)
                fh.write(data)  # over the blocks the file holds, then cut: a full disk cannot leave it empty
                fh.truncate()
                return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        target = self.root / prefix
        if prefix and target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        return count


class S3Store(ArtifactStore):
    """``s3://bucket/prefix``; credentials come only from the environment (boto3's default chain).

    ``pool_size``: HTTP connections kept (at least 32); boto discards the connections of calls beyond it."""

    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None,
                 pool_size: int | None = None):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StoreError(f"store.uri {uri!r}: expected s3://bucket[/prefix]")
        self.bucket = parsed.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise StoreError(f"store.uri {uri!r}: {self.bucket!r} is not a valid S3 bucket name (3-63 characters: "
                             "lower-case letters, digits, '.' and '-')")
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_REGION") or "us-east-1"
        self.pool_size = max(32, pool_size or 0)
        self.client = self._connect()

    def _connect(self):
        import boto3
        from botocore.config import Config

        cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"},
                     connect_timeout=10, read_timeout=120, max_pool_connections=self.pool_size)
        # A session of its own: boto3's default session caches the credentials it first saw.
        try:
            return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=cfg,
                                                  region_name=self.region)
        except ValueError as exc:  # an endpoint URL botocore cannot use
            from pipeline.redact import redact

            raise StoreError(f"S3 endpoint {redact(str(self.endpoint_url))}: {redact(str(exc))}") from None

    def ensure_pool(self, calls: int) -> None:
        """A larger pool when a stage makes more calls at once than it holds (a new client; call it before
        the stage's threads start)."""
        if calls > self.pool_size:
            self.pool_size = calls
            self.client = self._connect()

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, exc: Exception, key: str) -> StoreError:
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        from pipeline.redact import redact

        where = f"{self.uri}/{key}" if key else self.uri
        at = f" at {redact(self.endpoint_url)}" if self.endpoint_url else ""
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"{where}: cannot reach the S3 endpoint{at}")
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                if not key:  # head_bucket
                    return StoreError(f"S3 bucket '{self.bucket}' does not exist{at} (create it first)")
                return ArtifactNotFound(f"not found in store: {where}")
            if code == "NoSuchBucket":
                return StoreError(f"S3 bucket '{self.bucket}' does not exist{at} (create it first)")
            if code in ("AccessDenied", "403", "Forbidden") and key:
                bucket_problem = self._diagnose_bucket()  # a missing bucket often reads as AccessDenied
                if bucket_problem and "does not exist" in str(bucket_problem):
                    return bucket_problem
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                        "InvalidClientTokenId", "Forbidden"):
                return StoreError(f"{where}: access denied by S3{at} ({code}): check AWS_ACCESS_KEY_ID / "
                                  "AWS_SECRET_ACCESS_KEY")
            bucket_problem = self._diagnose_bucket() if key else None
            return bucket_problem or StoreError(f"{where}: S3 error {code}{at}")
        return StoreError(f"{where}: {exc.__class__.__name__}: {redact(' '.join(str(exc).split()))}")

    def _diagnose_bucket(self) -> StoreError | None:
        """Some servers answer an odd code (SeaweedFS: InternalError) for a missing bucket: ask directly."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            return self._fail(exc, "")
        except BotoCoreError:
            return None
        return None

    def _call(self, key: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        def read(**kwargs: Any) -> bytes:  # the body too: a connection broken mid-read is a StoreError
            return self.client.get_object(**kwargs)["Body"].read()

        return self._call(key, read, Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except ArtifactNotFound:
            return False
        return True

    def create(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        import hashlib

        return self._conditional_put(key, data, IfMatch=f'"{hashlib.md5(expected).hexdigest()}"')

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        """A PUT with an S3 precondition (AWS S3, MinIO and SeaweedFS honour them); False on 412/409/404."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            return True
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                return False
            raise self._fail(exc, key) from None
        except BotoCoreError as exc:
            raise self._fail(exc, key) from None

    def _listed(self, prefix: str, limit: int | None, delimiter: bool) -> list[str]:
        """The keys (and with ``delimiter`` the folders) of the LIST pages under ``prefix``, the pages only
        up to the first ``limit`` of them (boto's paginator is lazy: one call a page)."""
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paging = {"PaginationConfig": {"PageSize": min(limit, 1000)}} if limit else {}
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, **({"Delimiter": "/"} if delimiter else {}), **paging):
            found += [o["Key"] for o in page.get("Contents", [])] + [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            if limit is not None and len(found) >= limit:
                break
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in found if not (delimiter and k == full))[:limit]  # a folder's own marker

    def list(self, prefix: str = "", limit: int | None = None) -> Iterator[str]:
        return iter(self._call(prefix, self._listed, prefix=prefix, limit=limit, delimiter=False))

    def children(self, prefix: str = "", limit: int | None = None) -> list[str]:
        if prefix:
            _folder(prefix)
        return self._call(prefix, self._listed, prefix=prefix, limit=limit, delimiter=True)

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(prefix))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            self._call(prefix, self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)


async def blocking(store: ArtifactStore, fn: Callable[..., T], *args: Any) -> T:
    """A blocking call on ``store`` from async code: in a thread, except for a local directory, whose file
    operations (~50 us) cost less than the thread hop (~300 us of CPU measured at concurrency 64 on 2 cores)."""
    if store.quick:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def pool_size_for(concurrency: int) -> int:
    """Store calls at once of an LLM stage at ``concurrency``: its 2 x concurrency workers (claims, image
    reads, records) and the lease heartbeat (pipeline.llm.runner runs them in a thread pool this size)."""
    return 2 * concurrency + 2


def open_store(uri: str, endpoint_url: str | None = None, region: str | None = None,
               pool_size: int | None = None) -> ArtifactStore:
    """``pool_size``: store calls made at once (S3's connection pool; see ``pool_size_for``)."""
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url=endpoint_url, region=region, pool_size=pool_size)
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    if "://" in uri:
        raise StoreError(f"store.uri {uri!r}: use a local directory, file:///path or s3://bucket/prefix")
    return LocalStore(uri)
