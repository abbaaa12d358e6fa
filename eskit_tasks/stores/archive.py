"""The trash bin on a local directory: :class:`LocalArchive`, the
:class:`~eskit_tasks.ports.Archive` port on a disk.

One directory per stream, one entry per attempt of a compaction (its id and the fencing
token it held)::

    <root>/<stream type, percent-encoded>/<sha256(type NUL id)[:32]>/<id>.t<token>.jsonl.gz
                                                                   /<id>.t<token>.manifest.json

Two copies of one compaction hold different tokens, so the stale copy's write never
replaces the entry of the copy whose delete commits.

An entry is gzip (mtime 0: the same events give the same bytes) of JSON lines: a header,
then one object per event whose ``data`` and ``metadata`` are the stored JSON *text*, so
a restore puts back the very bytes that were deleted. The manifest is written after the
entry and holds its checksum: it is what makes an entry complete. An entry without one is
an interrupted write, which :meth:`LocalArchive.purge` clears away.

* :func:`archive_from_url` — the archive a setting names (a directory or ``file://`` URL);
* :func:`parse_keep` — a retention such as ``"30d"`` or ``"1d12h"``, for ``purge``.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import string
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

from eskit_tasks.domain.duration import parse_duration
from eskit_tasks.errors import ArchiveError, ConfigurationError
from eskit_tasks.ports import ArchivedEvent, ArchiveRef

#: The first line of every entry and every manifest names the layout it follows.
FORMAT = "eskit-archive/1"
#: An entry's file name is its stem (see :func:`entry_stem`) plus this.
ENTRY_SUFFIX = ".jsonl.gz"
#: The manifest that completes an entry: its stem plus this.
MANIFEST_SUFFIX = ".manifest.json"
#: Files being written: ``.<final name>.<random>.tmp`` (a leading dot no final name has).
TEMP_SUFFIX = ".tmp"
#: The audit log's column width, which bounds compaction ids everywhere.
MAX_COMPACTION_ID = 36
#: Stream types longer than this (percent-encoded) are cut and given a hash suffix.
MAX_TYPE_DIR = 64

_CHUNK = 1 << 18  # bytes read (and inflated) at a time while verifying
_BATCH = 1 << 16  # characters of JSON lines handed to gzip at once
_GZIP_LEVEL = 6  # zlib's default: level 9 costs twice the time for ~1% smaller entries
_SAFE = frozenset(string.ascii_letters + string.digits + "._-")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_quote = json.encoder.encode_basestring_ascii  # json.dumps(str) without the set-up
_decode = json.JSONDecoder().decode

log = logging.getLogger("eskit_tasks")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """A complete entry of a :class:`LocalArchive`, as its manifest describes it.

    Args:
        ref: What :meth:`LocalArchive.read` takes to read it back.
        compaction_id: The compaction that deleted these events.
        fence_token: The fencing token that attempt of the compaction held.
        stream_type: The stream's type.
        stream_id: The stream's id.
        first_version: The oldest event's version (None: the entry holds no events).
        last_version: The newest event's version (None: the entry holds no events).
        written_at: When the entry was completed (aware, UTC); what ``purge`` ages by.
        path: The entry's file.
    """

    ref: ArchiveRef
    compaction_id: str
    fence_token: int
    stream_type: str
    stream_id: str
    first_version: int | None
    last_version: int | None
    written_at: datetime
    path: Path


class LocalArchive:
    """The trash bin in a local directory (or anything mounted as one).

    ``write`` returns once entry and manifest are on disk: each is written to a temporary
    name, fsynced, renamed over its final name, and the directory fsynced. Should it fail,
    a previous entry under the same compaction id is either untouched or gone with its
    manifest; nothing half-written is ever left under a final name. Files are created
    readable by their owner only (events may hold personal data).

    Args:
        root: The archive's directory; created on the first write if missing.
        clock: Stamps ``written_at`` in manifests (default: the system clock, UTC).
    """

    def __init__(
        self, root: str | Path, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._root = Path(root).absolute()
        self._clock = clock

    @property
    def root(self) -> Path:
        """The archive's directory (absolute)."""
        return self._root

    def __repr__(self) -> str:
        return f"LocalArchive({str(self._root)!r})"

    def write(
        self,
        *,
        compaction_id: str,
        fence_token: int,
        stream_type: str,
        stream_id: str,
        events: Iterable[ArchivedEvent],
    ) -> ArchiveRef:
        """Store ``events`` (oldest first) as the entry of this attempt of the compaction,
        replacing an entry of the same id and token (never one of another token). Memory
        stays bounded however many events there are.

        Raises:
            ConfigurationError: ``compaction_id`` cannot name a file, or ``fence_token`` is
                not a non-negative integer (nothing written).
            ArchiveError: versions do not increase, an event cannot be encoded, or the disk
                refused (full, permissions); the message names the entry.
        """
        stem = entry_stem(compaction_id, fence_token)
        directory = self._stream_dir(stream_type, stream_id)
        entry = directory / f"{stem}{ENTRY_SUFFIX}"
        manifest = directory / f"{stem}{MANIFEST_SUFFIX}"
        header = {
            "format": FORMAT,
            "compaction_id": compaction_id,
            "fence_token": fence_token,
            "stream_type": stream_type,
            "stream_id": stream_id,
        }
        staged: list[Path] = []
        swapped = False
        try:
            digest, stats = self._stage(
                directory, entry.name, staged, lambda sink: _write_entry(sink, header, events)
            )
            # A retry: drop the old manifest first, so that neither entry ever looks
            # complete with the other's checksum. From here on, a failure removes both.
            swapped = True
            if _unlink(manifest):
                _fsync_dir(directory)
            os.replace(staged.pop(), entry)
            _fsync_dir(directory)
            written_at = self._clock().astimezone(UTC).isoformat()
            document = {**header, "sha256": digest, **stats, "written_at": written_at}
            body = json.dumps(document, indent=2).encode() + b"\n"
            self._stage(directory, manifest.name, staged, lambda sink: sink.write(body))
            os.replace(staged.pop(), manifest)
            _fsync_dir(directory)
        except BaseException as e:
            for path in [*staged, *((manifest, entry) if swapped else ())]:
                with suppress(OSError):
                    _unlink(path)
            if isinstance(e, OSError):
                raise ArchiveError(
                    f"cannot write archive entry {entry}: {e}; check that the archive "
                    "directory is writable and has free space, then run the compaction again"
                ) from e
            raise
        return ArchiveRef(uri=entry.as_uri(), sha256=digest, events=stats["events"])

    def read(self, ref: ArchiveRef) -> Iterator[ArchivedEvent]:
        """Yield the entry's events, oldest first, exactly as they were written.

        The whole file is checked (checksum, gzip stream, event count) before the first
        event is yielded; errors therefore come from the first ``next()``.

        Raises:
            ArchiveError: not a ``file://`` reference, the file is missing or unreadable,
                its checksum or event count differs from ``ref``, or a line is not an
                event; the message names the file.
        """
        path = self._locate(_path_of(ref.uri))
        try:
            with path.open("rb") as f:
                _verify(f, path, ref)
                f.seek(0)
                with gzip.GzipFile(filename="", mode="rb", fileobj=f) as lines:
                    self._check_header(path, next(lines, b""))
                    for number, line in enumerate(lines, start=2):
                        yield _decode_event(path, number, line)
        except (OSError, EOFError, zlib.error) as e:
            raise ArchiveError(f"cannot read archive entry {path}: {e}") from e

    def discard(self, ref: ArchiveRef) -> None:
        """Remove an entry of this archive whose delete was refused (manifest first, so a
        crash in between leaves a leftover that ``purge`` clears). Missing is not an error.

        Raises:
            ArchiveError: ``ref`` names a file outside this archive, or it cannot be removed.
        """
        path = self._locate(_path_of(ref.uri))
        inside = path.resolve().parent.parent.parent == self._root.resolve()
        if not inside or ".." in path.parts or not path.name.endswith(ENTRY_SUFFIX):
            raise ArchiveError(f"{ref.uri} is not an entry of the archive at {self._root}")
        manifest = path.with_name(path.name.removesuffix(ENTRY_SUFFIX) + MANIFEST_SUFFIX)
        try:
            removed = _unlink(manifest)
            removed = _unlink(path) or removed
            if removed:
                _fsync_dir(path.parent)
        except OSError as e:
            raise ArchiveError(f"cannot remove archive entry {path}: {e}") from e

    def entries(self) -> Iterator[ArchiveEntry]:
        """Yield the complete entries (those with a manifest), one directory at a time.

        Raises:
            ArchiveError: a manifest is unreadable or damaged (the message names it;
                remove it by hand to let ``purge`` clear the entry as a leftover).
        """
        for directory in self._stream_dirs():
            yield from self._scan(directory)[0]

    def purge(self, *, older_than: datetime, dry_run: bool = False) -> list[ArchiveEntry]:
        """Remove the entries written before ``older_than``, and the leftovers of
        interrupted writes (temporary files, an entry or manifest without the other)
        last modified before it. A write in progress is younger, so it is never touched.

        Args:
            older_than: The cut-off instant (aware).
            dry_run: Report what would be removed; remove nothing.

        Returns:
            The complete entries removed (or that would be); leftovers are only logged.

        Raises:
            ConfigurationError: ``older_than`` is naive.
            ArchiveError: a file cannot be removed, or a manifest is damaged.
        """
        if not isinstance(older_than, datetime) or older_than.utcoffset() is None:
            raise ConfigurationError(f"older_than must be timezone-aware, got {older_than!r}")
        removed: list[ArchiveEntry] = []
        for type_dir in _subdirs(self._root):
            emptied = False
            for directory in _subdirs(type_dir):
                emptied |= self._purge_dir(directory, older_than, dry_run, removed)
            if emptied:
                with suppress(OSError):  # not empty: other streams, or a write got there first
                    type_dir.rmdir()
        return removed

    def _purge_dir(
        self, directory: Path, older_than: datetime, dry_run: bool, removed: list[ArchiveEntry]
    ) -> bool:
        """Purge one stream directory (appending its old entries to ``removed``); return
        whether it was removed for being empty."""
        complete, leftovers = self._scan(directory)
        old = [e for e in complete if e.written_at < older_than]
        stale = [p for p in leftovers if _mtime(p) < older_than.timestamp()]
        removed.extend(old)
        for path in stale:
            log.info("archive purge: %s leftover %s", "would remove" if dry_run else "remove", path)
        if dry_run or not (old or stale):
            return False
        try:
            for entry in old:  # the manifest first: a crash in between leaves a leftover
                stem = entry_stem(entry.compaction_id, entry.fence_token)
                _unlink(entry.path.with_name(f"{stem}{MANIFEST_SUFFIX}"))
                _unlink(entry.path)
            for path in stale:
                _unlink(path)
        except OSError as e:
            raise ArchiveError(f"cannot purge archive entries in {directory}: {e}") from e
        try:
            directory.rmdir()
        except OSError:  # not empty: younger entries, or a write got there first
            return False
        return True

    def _stage(
        self, directory: Path, name: str, staged: list[Path], fill: Callable[[_HashingSink], T]
    ) -> tuple[str, T]:
        """Write a fsynced temporary file beside ``name`` with ``fill``; append its path to
        ``staged`` (the caller renames or removes it); return its sha256 and what ``fill``
        returned."""
        for attempt in itertools.count(1):
            try:
                self._make_dirs(directory)
                fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TEMP_SUFFIX)
                break
            except FileNotFoundError:  # a purge removed the emptied directory just now
                if attempt == 3:
                    raise
        staged.append(Path(temp))
        with os.fdopen(fd, "wb") as raw:
            sink = _HashingSink(raw)
            result = fill(sink)
            raw.flush()
            os.fsync(raw.fileno())
        return sink.hexdigest(), result

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and its missing parents, each made durable in its parent."""
        missing: list[Path] = []
        while not directory.is_dir() and directory != directory.parent:
            missing.append(directory)
            directory = directory.parent
        for made in reversed(missing):
            with suppress(FileExistsError):  # made by a concurrent write
                made.mkdir()
            _fsync_dir(made.parent)

    def _locate(self, path: Path) -> Path:
        """``path`` if it exists; else the same entry under this archive's root, so that an
        archive moved or mounted elsewhere still reads the paths its audit rows recorded."""
        tail = path.parts[-3:]
        if len(path.parts) < 4 or any(part in ("..", ".") for part in tail) or path.exists():
            return path
        moved = self._root.joinpath(*tail)
        return moved if moved.exists() else path

    def _stream_dir(self, stream_type: str, stream_id: str) -> Path:
        key = (stream_type + "\0" + stream_id).encode("utf-8", "surrogatepass")
        return self._root / _type_dir(stream_type) / hashlib.sha256(key).hexdigest()[:32]

    def _stream_dirs(self) -> Iterator[Path]:
        for type_dir in _subdirs(self._root):
            yield from _subdirs(type_dir)

    def _scan(self, directory: Path) -> tuple[list[ArchiveEntry], list[Path]]:
        """The complete entries of one stream directory, and the leftovers beside them."""
        try:
            names = set(os.listdir(directory))
        except FileNotFoundError:  # purged meanwhile
            return [], []
        except OSError as e:
            raise ArchiveError(f"cannot list archive directory {directory}: {e}") from e
        complete: list[ArchiveEntry] = []
        leftovers: list[Path] = []
        for name in sorted(names):
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                leftovers.append(directory / name)
            elif name.endswith(MANIFEST_SUFFIX):
                if name.removesuffix(MANIFEST_SUFFIX) + ENTRY_SUFFIX in names:
                    complete.append(self._load_manifest(directory / name))
                else:
                    leftovers.append(directory / name)
            elif (
                name.endswith(ENTRY_SUFFIX)
                and name.removesuffix(ENTRY_SUFFIX) + MANIFEST_SUFFIX not in names
            ):
                leftovers.append(directory / name)
        return complete, leftovers

    def _load_manifest(self, path: Path) -> ArchiveEntry:
        try:
            doc = json.loads(path.read_bytes())
            compaction_id, token = doc["compaction_id"], doc["fence_token"]
            stem = entry_stem(compaction_id, token)
            entry = path.with_name(f"{stem}{ENTRY_SUFFIX}")
            if doc["format"] != FORMAT or path.name != f"{stem}{MANIFEST_SUFFIX}":
                raise ValueError("it does not describe the entry beside it")
            if type(doc["sha256"]) is not str or type(doc["events"]) is not int:
                raise TypeError("sha256 or events has the wrong type")
            return ArchiveEntry(
                ref=ArchiveRef(uri=entry.as_uri(), sha256=doc["sha256"], events=doc["events"]),
                compaction_id=compaction_id,
                fence_token=token,
                stream_type=doc["stream_type"],
                stream_id=doc["stream_id"],
                first_version=doc["first_version"],
                last_version=doc["last_version"],
                written_at=_aware(doc["written_at"]),
                path=entry,
            )
        except (OSError, ValueError, KeyError, TypeError, ConfigurationError) as e:
            raise ArchiveError(
                f"archive manifest {path} is unreadable or damaged ({e}); remove it to let "
                "purge clear its entry"
            ) from e

    def _check_header(self, path: Path, line: bytes) -> None:
        try:
            header = json.loads(line)
            fields = [header["compaction_id"], header["stream_type"], header["stream_id"]]
            if header["format"] != FORMAT or not all(isinstance(f, str) for f in fields):
                raise ValueError(f"not a {FORMAT} header")
            compaction_id, stream_type, stream_id = fields
            stem = entry_stem(compaction_id, header["fence_token"])
        except (ValueError, KeyError, TypeError, ConfigurationError) as e:
            raise ArchiveError(f"archive entry {path} has no valid header ({e})") from e
        inside = path.parent.parent.parent == self._root
        if inside and (
            path.name != f"{stem}{ENTRY_SUFFIX}"
            or path.parent != self._stream_dir(stream_type, stream_id)
        ):
            raise ArchiveError(
                f"archive entry {path}: its header names compaction {compaction_id!r} of "
                f"stream {stream_type}/{stream_id}, which is kept elsewhere in the archive"
            )


def archive_from_url(url: str) -> LocalArchive:
    """The archive a setting names: ``file:///abs/path`` or a filesystem path.

    The directory is created if missing, so a mistake shows now rather than at the first
    compaction.

    Raises:
        ConfigurationError: another scheme, or the directory cannot be used.
    """
    if _URL_SCHEME.match(url):
        parts = urlsplit(url)
        if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
            raise ConfigurationError(
                f"unsupported archive URL {url!r}: only local directories are supported "
                "(file:///absolute/path or a path); for other storage, implement the "
                "eskit_tasks.ports.Archive protocol and pass an instance"
            )
        root = Path(url2pathname(parts.path))
    elif url.strip():
        root = Path(url)
    else:
        raise ConfigurationError("the archive location is empty: give a directory path")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigurationError(f"archive location {root} exists and is not a directory") from None
    except OSError as e:
        raise ConfigurationError(f"cannot create archive directory {root}: {e}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigurationError(f"archive directory {root} is not writable by this user")
    return LocalArchive(root)


def parse_keep(text: str) -> timedelta:
    """Parse a retention such as ``"30d"``, ``"1d12h"``, ``"2 weeks"`` or plain seconds
    (``"3600"``): the grammar of :func:`~eskit_tasks.domain.duration.parse_duration`,
    the one ``retain_younger_than`` reads too.

    Raises:
        ConfigurationError: anything else; the message lists the accepted forms.
    """
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ConfigurationError(f"retention: {exc}") from None


class _HashingSink:
    """A write-only file that hashes what passes through: the checksum of the bytes as
    they reach the disk, without reading them back."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()

    def write(self, data: bytes, /) -> int:
        self._hash.update(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _write_entry(
    sink: _HashingSink, header: dict[str, Any], events: Iterable[ArchivedEvent]
) -> dict[str, Any]:
    """Stream the gzipped JSON lines of an entry into ``sink``; return the manifest's counts."""
    label = f"{header['stream_type']}/{header['stream_id']}"
    count = 0
    first: int | None = None
    last: int | None = None
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=sink, compresslevel=_GZIP_LEVEL, mtime=0
    ) as gz:
        batch = [json.dumps(header, separators=(",", ":")), "\n"]
        size = 0
        for event in events:
            line = _encode_event(label, event)
            if last is not None and not event.version > last:
                raise ArchiveError(
                    f"cannot archive {label}: version {event.version} follows {last}; "
                    "versions must increase"
                )
            first = event.version if first is None else first
            last = event.version
            count += 1
            batch.append(line)
            size += len(line)
            if size >= _BATCH:
                gz.write("".join(batch).encode())
                batch.clear()
                size = 0
        gz.write("".join(batch).encode())
    return {"events": count, "first_version": first, "last_version": last}


def _encode_event(label: str, event: ArchivedEvent) -> str:
    # One f-string per event, the strings quoted by json's C encoder: a million events
    # are archived in seconds. ensure_ascii makes any string (even a lone surrogate)
    # encodable; the JSON text of data and metadata is kept as a string, never parsed.
    try:
        moment = event.recorded_at
        if moment.utcoffset() is None:
            raise ValueError("recorded_at is naive")
        if moment.tzinfo is not UTC:
            moment = moment.astimezone(UTC)
        return (
            f'{{"version":{event.version:d},"type":{_quote(event.type)},'
            f'"data":{_quote(event.data)},"metadata":{_quote(event.metadata)},'
            f'"recorded_at":"{moment.isoformat("T", "microseconds")}",'
            f'"position":{event.position:d}}}\n'
        )
    except (AttributeError, TypeError, ValueError) as e:
        version = getattr(event, "version", None)  # not the payload: it may be large, or personal
        raise ArchiveError(
            f"cannot archive {label}: the event at version {version!r} cannot be encoded ({e})"
        ) from e


def _decode_event(path: Path, number: int, line: bytes) -> ArchivedEvent:
    try:
        obj = _decode(line.decode())
        event = ArchivedEvent(
            version=obj["version"],
            type=obj["type"],
            data=obj["data"],
            metadata=obj["metadata"],
            recorded_at=_aware(obj["recorded_at"]),
            position=obj["position"],
        )
        if not (
            type(event.version) is int
            and type(event.position) is int
            and type(event.type) is str
            and type(event.data) is str
            and type(event.metadata) is str
        ):
            raise TypeError("a field has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        raise ArchiveError(f"archive entry {path}, line {number}: not an event ({e})") from e
    return event


def _verify(f: IO[bytes], path: Path, ref: ArchiveRef) -> None:
    """Hash the whole file and count its lines (inflating in bounded steps)."""
    digest = hashlib.sha256()
    inflater = zlib.decompressobj(wbits=31)  # gzip framing
    newlines = 0
    damage: str | None = None
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        if damage is None:
            try:
                data = inflater.decompress(chunk, _CHUNK)
                newlines += data.count(b"\n")
                while inflater.unconsumed_tail:
                    data = inflater.decompress(inflater.unconsumed_tail, _CHUNK)
                    newlines += data.count(b"\n")
            except zlib.error as e:
                damage = str(e)
    if digest.hexdigest() != ref.sha256:
        raise ArchiveError(
            f"archive entry {path} is damaged or was altered: its sha256 is "
            f"{digest.hexdigest()}, {ref.sha256} was recorded when it was written"
        )
    if damage or not inflater.eof or inflater.unused_data:
        reason = damage or "it ends early, or has data after its end"
        raise ArchiveError(f"archive entry {path} is not one complete gzip stream: {reason}")
    if newlines - 1 != ref.events:
        raise ArchiveError(
            f"archive entry {path} holds {newlines - 1} events, the reference says {ref.events}"
        )


def entry_stem(compaction_id: str, fence_token: int) -> str:
    """The file name, less its suffix, of one attempt's entry: ``<id>.t<token>``.

    Raises:
        ConfigurationError: the id cannot name a file, or the token is not an integer ≥ 0.
    """
    _check_compaction_id(compaction_id)
    if type(fence_token) is not int or fence_token < 0:
        raise ConfigurationError(f"fence_token must be an integer >= 0, got {fence_token!r}")
    return f"{compaction_id}.t{fence_token}"


def _check_compaction_id(compaction_id: object) -> None:
    """A compaction id becomes a file name: refuse what would escape or clash."""
    problem = None
    if not isinstance(compaction_id, str) or not 0 < len(compaction_id) <= MAX_COMPACTION_ID:
        problem = f"must be a string of 1 to {MAX_COMPACTION_ID} characters"
    elif compaction_id.startswith(".") or any(c in compaction_id for c in "/\\"):
        problem = "must not start with '.' nor contain '/' or '\\'"
    elif not compaction_id.isprintable():
        problem = "must not contain control characters"
    else:
        try:
            compaction_id.encode("utf-8")
        except UnicodeEncodeError:
            problem = "must be valid Unicode text (no lone surrogates)"
    if problem is not None:
        raise ConfigurationError(f"compaction_id {compaction_id!r} {problem} to name a file")


def _type_dir(stream_type: str) -> str:
    """A readable, filesystem-safe directory name for a stream type (not unique: the
    stream directory beneath it is keyed by a hash of the type and id)."""
    if not stream_type:
        return "%empty"
    name = "".join(
        c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in stream_type
    )
    if name.startswith("."):  # ".", ".." and hidden names
        name = "%2E" + name[1:]
    if len(name) > MAX_TYPE_DIR:
        cut = name[: MAX_TYPE_DIR - 9]
        if "%" in cut[-2:]:  # do not split an escape
            cut = cut[: cut.rindex("%")]
        whole = hashlib.sha256(stream_type.encode("utf-8", "surrogatepass")).hexdigest()
        name = f"{cut}~{whole[:8]}"
    return name


def _path_of(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ArchiveError(
            f"archive entry {uri!r} is not a local file:// URL; read it with the archive "
            "that wrote it"
        )
    return Path(url2pathname(parts.path))


def _aware(text: object) -> datetime:
    if not isinstance(text, str):
        raise TypeError(f"{text!r} is not a timestamp")
    moment = datetime.fromisoformat(text)
    if moment.utcoffset() is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset")
    return moment.astimezone(UTC)


def _subdirs(directory: Path) -> Iterator[Path]:
    """The directories in ``directory``, as the file system lists them (never all at once:
    an archive may hold millions of streams)."""
    try:
        with os.scandir(directory) as found:
            for item in found:
                if item.is_dir(follow_symlinks=False):
                    yield Path(item.path)
    except FileNotFoundError:  # not written yet, or purged meanwhile
        return
    except OSError as e:
        raise ArchiveError(f"cannot list archive directory {directory}: {e}") from e


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # gone meanwhile (renamed by its write, or purged)
        return float("inf")


def _unlink(path: Path) -> bool:
    """Remove ``path``; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (a rename, a new entry) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
