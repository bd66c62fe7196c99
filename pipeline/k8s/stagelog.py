"""A stage Job's own log, kept in the store: pods (and their logs) go with the Job's TTL, the store stays.
``ielts-distill stage`` (every Job's entrypoint) writes ``<run>/_logs/<stage>/<part>.log`` when the stage ends,
however it ends; ``ielts-distill logs`` reads it once no pod is left to stream from."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from pipeline.errors import StoreError
from pipeline.records import Shard
from pipeline.store import ArtifactStore

FORMAT = "%(asctime)s %(levelname)-5s %(message)s"


def log_key(run_id: str, stage: str, shard: Shard) -> str:
    part = "all" if shard.whole else f"shard-{shard.index}-of-{shard.count}"
    return f"{run_id}/_logs/{stage}/{part}.log"


@contextlib.contextmanager
def kept_in_store(store: ArtifactStore, key: str) -> Iterator[None]:
    """Copy what the ``ielts_distill`` loggers say meanwhile into ``key`` at the end (a failed stage too)."""
    lines: list[str] = []
    store_down = False

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("ielts_distill")
    logger.addHandler(handler)
    try:
        yield
    except BaseException as exc:  # what the CLI prints on its way out belongs to the log too
        lines.append(f"error: {exc}" if str(exc) else f"error: {exc.__class__.__name__}")
        store_down = isinstance(exc, StoreError)  # no second wait on a store that just failed
        raise
    finally:
        logger.removeHandler(handler)
        try:
            if not store_down:
                store.put_text(key, "".join(line + "\n" for line in lines))
        except Exception as exc:  # noqa: BLE001 - a log copy must never hide the stage's own outcome
            logger.debug("could not keep the stage log at %s: %s", store.url(key), exc)


def stored_logs(store: ArtifactStore, run_id: str, stage: str, index: int | None = None) -> Iterator[str]:
    """The kept log lines of a stage (every part, or shard ``index``'s), each part headed by its name."""
    prefix = f"{run_id}/_logs/{stage}/"
    for key in store.list(prefix):
        part = key[len(prefix):].removesuffix(".log")
        if index is not None and not part.startswith(f"shard-{index}-of-"):
            continue
        yield f"== {store.url(key)}"
        yield from store.get_text(key).splitlines()
