"""The packed dataset layout: one uncompressed ZIP per kind of image, and the one way to read dataset images.

A dataset folder ``data/<name>/`` holds ``manifest.csv``, ``images.zip`` (written by ingest),
``augmented.csv`` and ``augmented.zip`` (written by augment) and ``profile.json`` (written by validate).
A pack's members are named by the manifest's ``path`` column (``images/<label>/<sha16>.png``,
``augmented/<label>/<sha16>-<k>.png``), so the manifest and its paths are the same as in the loose layout
that came before (one file per image); DVC now versions a handful of files instead of one per image.

Writing (:class:`PackWriter`): members are added in any order, spooled to a side file, and written when the
writer closes in the order of their names, stored (PNGs are compressed already), with a fixed date
(1980-01-01 00:00:00) and fixed permissions (0644, Unix). The same members therefore give a byte-identical
pack, and the same DVC data version, whatever order the images arrived in. The written pack is read back
(its central directory, by the reader's rules) before the writer reports success.

Reading (:class:`DatasetReader`): a manifest path is resolved to the pack of its first component
(``images`` -> ``images.zip``, ``augmented`` -> ``augmented.zip``).

* When the pack exists it is opened once per reader: a regular file inside the dataset folder (a final
  symbolic link is not followed), whose central directory is checked as a whole before any member is
  read. A member named with ``..``, an absolute path, a backslash or a NUL, a name listed twice, a
  compressed or encrypted member, or a pack that is not a readable ZIP (truncated, corrupt) refuses the
  pack, by name. A member's declared size is checked against the caller's limit before it is read, at
  most limit + 1 bytes are read, and its CRC-32 is checked.
* When there is no pack, the loose file ``data/<name>/<path>`` is read (datasets versioned before packs,
  restored by ``mlops data checkout``, or written by hand): it must resolve inside the dataset folder and
  be a regular file; it is opened without following a final link and without blocking, and at most
  limit + 1 bytes are read.

Every refusal is a :class:`DatasetReadError` whose ``reason`` is the short text validation lists next to
the manifest path, and whose message names the file or the pack.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Self

from pipelines.errors import PipelineError

PACK_KINDS: dict[str, str] = {"images": "images.zip", "augmented": "augmented.zip"}
"""First component of a manifest path -> the pack holding such members, in the dataset folder."""

PACK_DATE_TIME = (1980, 1, 1, 0, 0, 0)
"""The date every member carries (the earliest a ZIP can hold), so packs do not depend on the clock."""

PACK_MEMBER_MODE = 0o100644
"""The permissions (a regular file, rw-r--r--) every member carries."""

_SPOOL_SUFFIX = ".spool"
_CHUNK_BYTES = 1 << 20


class DatasetReadError(PipelineError):
    """A dataset image that cannot be read: the message names the file or pack and the problem.

    ``reason`` is what validation lists next to the image's manifest path: the problem alone when it is the
    image's (``file not found``, ``member of <pack> is N bytes, over ...``), the whole message, naming the
    pack, when the pack as a whole is unusable (``where`` is then empty).
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.where = where
        self.reason = reason

    def __reduce__(self) -> tuple[type[DatasetReadError], tuple[str, str]]:
        return type(self), (self.where, self.reason)  # survives pickling (errors of worker processes)


def pack_path(dataset_dir: Path, kind: str) -> Path:
    """The pack of ``kind`` (``images`` or ``augmented``) in ``dataset_dir``."""
    return dataset_dir / PACK_KINDS[kind]


def unsafe_member_name(name: str) -> str:
    """Why ``name`` cannot be a pack member (``..``, absolute, backslash, NUL, empty part), or ``""``."""
    if not name or "\0" in name:
        return "is empty or holds a NUL character"
    if "\\" in name:
        return "holds a backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "holds '..'"
    if any(part in ("", ".") for part in parts):
        return "holds an empty or '.' part"
    return ""


# -------------------------------------------------------------------------------------------- writing


class PackWriter:
    """Write one pack: :meth:`add` members in any order, then :meth:`close` writes them sorted by name.

    The pack's folder is created if needed; the spool file (``<pack>.spool``) sits beside the pack.

    Used as a context manager, a block that raises leaves neither the pack nor its spool file behind.
    Errors while writing are ``OSError`` (a full disk...) naming the spool or the pack; a pack that does not
    read back is a :class:`DatasetReadError` naming it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spool_path = path.with_name(path.name + _SPOOL_SUFFIX)
        if _exists(path):  # a writer only ever removes what it wrote itself
            raise PipelineError(f"{path}: a pack is written into a new file only, and this one exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._spool: IO[bytes] | None = open(self.spool_path, "xb")  # noqa: SIM115  # closed by close()/abort()
        self._members: dict[str, tuple[int, int]] = {}
        self._offset = 0

    def __len__(self) -> int:
        return len(self._members)

    def add(self, name: str, data: bytes) -> None:
        """Add member ``name`` (a manifest path) holding ``data``; a second member of that name is refused."""
        problem = unsafe_member_name(name)
        if problem:
            raise PipelineError(f"{self.path}: member name {name!r} {problem}; refused")
        if name in self._members:
            raise PipelineError(f"{self.path}: member {name} added twice (two images with one name)")
        if self._spool is None:
            raise PipelineError(f"{self.path}: the pack is already closed")
        self._spool.write(data)
        self._members[name] = (self._offset, len(data))
        self._offset += len(data)

    def close(self) -> None:
        """Write the pack (members sorted by name), check it reads back, and remove the spool."""
        if self._spool is None:
            return
        self._spool.close()
        self._spool = None
        try:
            with open(self.spool_path, "rb") as spool, zipfile.ZipFile(self.path, "x", zipfile.ZIP_STORED) as pack:
                for name in sorted(self._members):
                    offset, size = self._members[name]
                    info = zipfile.ZipInfo(name, PACK_DATE_TIME)
                    info.compress_type = zipfile.ZIP_STORED
                    info.create_system = 3  # Unix, whatever the platform, so external_attr means the same
                    info.external_attr = PACK_MEMBER_MODE << 16
                    spool.seek(offset)
                    pack.writestr(info, spool.read(size))
            self._check_written()
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            self.spool_path.unlink(missing_ok=True)

    def _check_written(self) -> None:
        """Read the written pack's central directory back (the reader's checks) and compare it with the members."""
        with _Pack.open(self.path) as pack:
            written = {info.filename: info.file_size for info in pack.members.values()}
        expected = {name: size for name, (_, size) in self._members.items()}
        if written != expected:
            missing = sorted(expected.keys() - written.keys())[:3]
            raise DatasetReadError(
                "",
                f"{self.path}: the written pack does not read back as written"
                f" ({len(written)} members for {len(expected)}"
                + (f"; missing e.g. {', '.join(missing)}" if missing else "")
                + ")",
            )

    def abort(self) -> None:
        """Drop what was added: remove the spool and any partly written pack."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.spool_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_pack(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write the pack ``path`` holding ``members`` ((name, bytes) pairs, any order) in one go."""
    with PackWriter(path) as writer:
        for name, data in members:
            writer.add(name, data)


# -------------------------------------------------------------------------------------------- reading


def _open_regular(path: Path, where: str) -> int:
    """An open descriptor of the regular file ``path`` (not followed through a final link, never blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DatasetReadError(where, "file not found") from None
    except OSError as error:
        if os.path.islink(path):
            raise DatasetReadError(where, "is a symbolic link; refused") from None
        raise DatasetReadError(where, f"cannot read file: {error.strerror or error}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        os.close(fd)
        raise DatasetReadError(where, f"cannot read file: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DatasetReadError(where, "not a regular file; refused")
    return fd


def _over_limit(size: int, limit: int, what: str = "file") -> str:
    return f"{what} is {size} bytes, over ingest.max_file_bytes={limit}"


class _Pack:
    """One open pack: its members by name, checked as a whole when opened."""

    def __init__(self, path: Path, archive: zipfile.ZipFile) -> None:
        self.path = path
        self.archive = archive
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            problem = unsafe_member_name(info.filename)
            if problem:
                raise DatasetReadError("", f"{path}: member {info.filename!r} {problem}; the pack is refused")
            if info.filename in self.members:
                raise DatasetReadError("", f"{path}: member {info.filename} is listed twice; the pack is refused")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise DatasetReadError(
                    "", f"{path}: member {info.filename} is compressed or encrypted (packs are stored); refused"
                )
            self.members[info.filename] = info

    @classmethod
    def open(cls, path: Path) -> _Pack:
        """Open and check the pack ``path``; :class:`DatasetReadError` naming it if it cannot be used."""
        try:
            fd = _open_regular(path, str(path))
        except DatasetReadError as error:
            raise DatasetReadError("", f"{path}: {error.reason}") from None
        handle = os.fdopen(fd, "rb")
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            handle.close()
            raise DatasetReadError(
                "", f"{path}: not a readable pack, truncated or corrupt ({type(error).__name__}: {error})"
            ) from None
        try:
            return cls(path, archive)
        except BaseException:
            archive.close()
            handle.close()
            raise

    def read(self, name: str, limit: int) -> bytes:
        info = self.members.get(name)
        if info is None:
            raise DatasetReadError(name, f"not found in {self.path}")
        if info.file_size > limit:
            raise DatasetReadError(name, _over_limit(info.file_size, limit, f"member of {self.path}"))
        try:
            with self.archive.open(info) as member:
                data = member.read(limit + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise DatasetReadError(
                name, f"cannot be read from {self.path}, truncated or corrupt ({type(error).__name__}: {error})"
            ) from None
        if len(data) > limit:  # cannot happen for a stored member of the declared size; a bounded read anyway
            raise DatasetReadError(name, _over_limit(len(data), limit, f"member of {self.path}"))
        return data

    def close(self) -> None:
        fp = self.archive.fp
        self.archive.close()
        if fp is not None:
            fp.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DatasetReader:
    """Read dataset images by manifest path, from the dataset's packs or, without a pack, its loose files.

    A context manager: packs are opened on first use and closed at the end of the block. Not thread-safe
    (one reader per thread or process). See the module docstring for what is checked.
    """

    def __init__(self, dataset_dir: Path) -> None:
        self.dataset_dir = dataset_dir
        self._root: Path | None = None
        self._packs: dict[str, _Pack | DatasetReadError | None] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the packs opened so far."""
        for pack in self._packs.values():
            if isinstance(pack, _Pack):
                pack.close()
        self._packs.clear()

    @property
    def root(self) -> Path:
        """The dataset folder, resolved (links followed) once."""
        if self._root is None:
            self._root = self.dataset_dir.resolve()
        return self._root

    def layout(self, kind: str) -> str:
        """``packed`` when the pack of ``kind`` exists, else ``loose``."""
        return "packed" if _exists(pack_path(self.dataset_dir, kind)) else "loose"

    def _pack(self, kind: str) -> _Pack | None:
        """The open pack of ``kind``; None when there is none (loose layout). A broken pack raises, every time."""
        if kind not in PACK_KINDS:
            return None
        if kind not in self._packs:
            path = pack_path(self.dataset_dir, kind)
            if not _exists(path):
                self._packs[kind] = None
            else:
                try:
                    self._packs[kind] = _Pack.open(path)
                except DatasetReadError as error:
                    self._packs[kind] = error
        found = self._packs[kind]
        if isinstance(found, DatasetReadError):
            raise DatasetReadError(found.where, found.reason)
        return found

    def location(self, path: str) -> str:
        """Where the image at manifest path ``path`` is read from, for messages: ``<pack> member <path>`` or a file."""
        kind = path.split("/", 1)[0]
        if kind in PACK_KINDS and self.layout(kind) == "packed":
            return f"{pack_path(self.dataset_dir, kind)} member {path}"
        return str(self.dataset_dir / path)

    def members(self, kind: str) -> list[str] | None:
        """The member names of the pack of ``kind``, sorted; None when there is no such pack (loose layout)."""
        pack = self._pack(kind)
        return None if pack is None else sorted(pack.members)

    def check(self, kind: str) -> None:
        """Open the pack of ``kind`` if there is one; :class:`DatasetReadError` naming it if it is unusable."""
        self._pack(kind)

    def read(self, path: str, limit_bytes: int) -> bytes:
        """The bytes of the image at manifest path ``path``, at most ``limit_bytes`` of them.

        Raises :class:`DatasetReadError` (``reason`` and a message naming the file or pack) for a path with
        ``..`` or an absolute path, a path leaving the dataset folder, a missing file or member, a file over
        the limit, a file that is not a regular file, or a pack that is unreadable or refused.
        """
        kind = path.split("/", 1)[0]
        if kind in PACK_KINDS:
            problem = unsafe_member_name(path)
            if problem:
                raise DatasetReadError(path, f"path {problem}; refused")
            pack = self._pack(kind)
            if pack is not None:
                return pack.read(path, limit_bytes)
        return self._read_loose(path, limit_bytes)

    def _read_loose(self, path: str, limit: int) -> bytes:
        where = str(self.dataset_dir / path)
        if PurePosixPath(path).is_absolute():
            raise DatasetReadError(where, "path leaves the dataset folder")
        file = (self.root / path).resolve()
        if not file.is_relative_to(self.root):
            raise DatasetReadError(where, "path leaves the dataset folder")
        fd = _open_regular(file, where)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise DatasetReadError(where, _over_limit(size, limit))
            chunks: list[bytes] = []
            total = 0
            while total <= limit:
                chunk = os.read(fd, min(_CHUNK_BYTES, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            if total > limit:
                raise DatasetReadError(where, f"holds more than {limit} bytes, over ingest.max_file_bytes={limit}")
            return b"".join(chunks)
        except OSError as error:
            raise DatasetReadError(where, f"cannot read file: {error.strerror or error}") from None
        finally:
            os.close(fd)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()
