"""The artifact registry: immutable, content-hashed versions of datasets, models, weights and eval reports,
kept in the bucket with no extra server.

Layout under ``<registry.prefix>/``::

    <kind>/<name>/objects/<upload-id>/<path>      the files of one version (its own prefix)
    <kind>/<name>/versions/<N:010d>.json          the manifest; created LAST with If-None-Match: *
    <kind>/<name>/aliases/<alias>.json            {version, history}; moved by compare-and-swap (If-Match)
    <kind>/<name>/content/<sha256>.json           content index for deduplication
    <kind>/<name>/latest-hint.json                where listing for ``latest`` may start (a hint, not a pointer)
    _lineage/<kind>/<name>/<N>/<kind>/<name>/<N>  one empty object per edge parent -> child

A version exists once its manifest exists. Two writers racing for number N both try to create the manifest
conditionally; exactly one wins and the other takes the next number. ``latest`` is the highest number in the
listing, never a stored pointer. Files uploaded by an import that died before its manifest are orphans that
``gc`` removes.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import random
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from reflade.platform.config import Config
from reflade.platform.progress import byte_bar
from reflade.platform.storage import ObjectNotFound, PreconditionFailed, Storage, StorageError

MANIFEST_SCHEMA = 1
KNOWN_KINDS = ("dataset", "model", "weights", "eval-report", "votes", "raw-images")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SEL = r"[a-z0-9][a-z0-9._-]{0,63}"
REF_RE = re.compile(rf"(?P<kind>{_SEL})/(?P<name>{_SEL})(?:@(?P<sel>{_SEL}))?(?::(?P<split>{_SEL}))?")
LATEST = "latest"
_ALIAS_HISTORY_KEEP = 1000


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message names the reference and what exists."""


class AliasConflict(RegistryError):
    """A compare-and-swap alias move lost: the alias no longer points where the caller expected."""

    def __init__(self, message: str, current: int | None):
        super().__init__(message)
        self.current = current
        """The version the alias points at now (None: no such alias)."""


ANY_VERSION = object()
"""``Registry.set_alias(expected=...)``'s default: move the alias wherever it points now."""


class IntegrityError(RegistryError):
    """A downloaded file does not match the sha256 or size its manifest records."""


def validate_name(value: str, what: str = "name") -> str:
    """Check a kind, name or alias against ``[a-z0-9][a-z0-9._-]{0,63}`` (no ``..``, no ``/``)."""
    if not isinstance(value, str) or not value:
        raise RegistryError(f"invalid {what} {value!r}: empty")
    if ".." in value or "/" in value or "\\" in value:
        raise RegistryError(f"invalid {what} {value!r}: '..', '/' and '\\' are not allowed")
    if len(value) > 64:
        raise RegistryError(f"invalid {what} {value[:70]!r}...: at most 64 characters")
    if not NAME_RE.fullmatch(value):
        raise RegistryError(
            f"invalid {what} {value!r}: use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return value


def validate_alias(alias: str) -> str:
    validate_name(alias, "alias")
    if alias.isdigit():
        raise RegistryError(
            f"invalid alias {alias!r}: an alias is never all digits (that reads as a version)"
        )
    return alias


def validate_relpath(path: str) -> str:
    """A file path inside a version: relative, '/'-separated, no '..' or empty parts."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise RegistryError(f"invalid file path {path!r} in a version: must be relative, without '..'")
    return path


@dataclass(frozen=True)
class Ref:
    """A parsed reference ``KIND/NAME[@VERSION|@ALIAS][:SPLIT]``."""

    kind: str
    name: str
    version: int | None = None
    alias: str | None = None
    split: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        if not isinstance(text, str):
            raise RegistryError(
                f"invalid reference {text!r}: expected a string KIND/NAME[@VERSION|@ALIAS][:SPLIT]"
            )
        m = REF_RE.fullmatch(text.strip())
        if not m or ".." in text:
            raise RegistryError(
                f"invalid reference {text!r}: expected KIND/NAME[@VERSION|@ALIAS][:SPLIT], "
                f"e.g. model/reflayer@production or dataset/reflade-demo@3:test"
            )
        sel = m["sel"]
        version = alias = None
        if sel is None:
            alias = LATEST
        elif sel.isdigit():
            version = int(sel)
            if version < 1:
                raise RegistryError(f"invalid reference {text!r}: versions start at 1")
        else:
            alias = sel
        return cls(m["kind"], m["name"], version, alias, m["split"])

    def __str__(self) -> str:
        s = f"{self.kind}/{self.name}"
        if self.version is not None:
            s += f"@{self.version}"
        elif self.alias and self.alias != LATEST:
            s += f"@{self.alias}"
        if self.split:
            s += f":{self.split}"
        return s


@dataclass
class Version:
    """One registered, immutable version: its manifest and where its files are."""

    manifest: dict[str, Any]
    bucket: str
    reused: bool = False
    """True when ``create`` found identical content already registered and returned it."""
    skipped_links: list[str] = field(default_factory=list)
    """Symbolic links ``create`` left out of a folder it imported (relative paths); links are never followed."""
    split: str | None = None
    """The ``:SPLIT`` of the reference it was resolved from, if any."""

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}@{self.version}"

    @property
    def prefix(self) -> str:
        return self.manifest["prefix"]

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.manifest["files"]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.get("metadata", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def parents(self) -> list[str]:
        return self.manifest.get("parents", [])

    def key(self, path: str) -> str:
        return self.prefix + path

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{self.key(path)}"

    def size(self) -> int:
        return sum(f["size"] for f in self.files)


@dataclass
class AliasMove:
    alias: str
    from_version: int | None
    to_version: int
    by: str
    at: str


@dataclass
class GcReport:
    orphans: list[dict[str, Any]] = field(default_factory=list)
    kept_young: int = 0
    deleted: bool = False

    @property
    def bytes(self) -> int:
        return sum(o["size"] for o in self.orphans)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def default_creator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return os.environ.get("REFLADE_CREATOR") or f"{user}@{socket.gethostname()}"


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def content_hash(files: Iterable[dict[str, Any]]) -> str:
    listing = sorted((f["path"], f["sha256"], f["size"]) for f in files)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _refuse_link(path: Path, what: str) -> None:
    if path.is_symlink():
        raise RegistryError(
            f"{what} {path} is a symbolic link; the registry does not follow links (one could point at a file "
            f"that must not leave this machine, such as credentials): import the file or folder it points to"
        )


def collect_files(src: str | os.PathLike, skipped_links: list[str] | None = None) -> dict[str, Path]:
    """A file -> {its name: path}; a folder -> {relative posix path: path} for every regular file below it.

    Symbolic links are never followed, as in the engine's ingest: ``src`` itself being one is refused, and
    links inside a folder (to files or to folders) are left out and their relative paths appended to
    ``skipped_links``, so that the caller can say so.

    Raises:
        RegistryError: ``src`` is missing or a symbolic link, a path is invalid, or the folder holds no files.
    """
    src = Path(src)
    _refuse_link(src, "source")
    if src.is_file():
        return {validate_relpath(src.name): src}
    if not src.is_dir():
        raise RegistryError(f"{src} does not exist (expected a file or a folder)")
    out: dict[str, Path] = {}
    links: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = here / name
            if p.is_symlink():
                links.append(p.relative_to(src).as_posix())
            elif name in filenames and p.is_file():
                out[validate_relpath(p.relative_to(src).as_posix())] = p
    links.sort()
    if skipped_links is not None:
        skipped_links.extend(links)
    if not out:
        skipped = f" ({len(links)} symbolic links skipped: {', '.join(links[:5])})" if links else ""
        raise RegistryError(f"folder {src} holds no files{skipped}")
    return dict(sorted(out.items()))


class Registry:
    """Client of the registry in one bucket. Thread-safe (boto3 clients are)."""

    def __init__(self, storage: Storage, prefix: str = "registry"):
        self.storage = storage
        self.prefix = prefix.strip("/") + "/"

    @classmethod
    def from_config(cls, cfg: Config) -> Registry:
        return cls(Storage.from_config(cfg), cfg.registry.prefix)

    # ------------------------------------------------------------------ keys
    def _base(self, kind: str, name: str) -> str:
        return f"{self.prefix}{validate_name(kind, 'kind')}/{validate_name(name)}/"

    def _manifest_key(self, kind: str, name: str, version: int) -> str:
        return f"{self._base(kind, name)}versions/{version:010d}.json"

    def _alias_key(self, kind: str, name: str, alias: str) -> str:
        return f"{self._base(kind, name)}aliases/{alias}.json"

    def _lineage_prefix(self, kind: str, name: str, version: int) -> str:
        return f"{self.prefix}_lineage/{kind}/{name}/{version:010d}/"

    # ------------------------------------------------------------------ reading
    def kinds(self) -> list[str]:
        return sorted(
            p[len(self.prefix) : -1]
            for p in self.storage.list_prefixes(self.prefix)
            if not p.endswith("_lineage/")
        )

    def names(self, kind: str) -> list[str]:
        base = f"{self.prefix}{validate_name(kind, 'kind')}/"
        return sorted(p[len(base) : -1] for p in self.storage.list_prefixes(base))

    def versions(self, kind: str, name: str) -> list[int]:
        """Version numbers of KIND/NAME, ascending (from the listing: the source of truth for ``latest``)."""
        base = self._base(kind, name) + "versions/"
        out = []
        for obj in self.storage.list(base):
            stem = obj["Key"][len(base) :].removesuffix(".json")
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def latest_version(self, kind: str, name: str) -> int | None:
        """The highest version number, from the listing.

        A hint object (the last number a writer registered) only says where to start listing: keys are
        zero-padded, so listing after the hint returns the few versions newer than it. A stale or lost hint
        costs a longer listing, never a wrong answer.
        """
        base = self._base(kind, name) + "versions/"
        start = None
        try:
            hint, _ = self.storage.get_json(self._base(kind, name) + "latest-hint.json")
            start = f"{base}{int(hint['version']) - 1:010d}.json" if int(hint["version"]) > 1 else None
        except (ObjectNotFound, KeyError, TypeError, ValueError, StorageError):
            start = None
        latest = None
        for obj in self.storage.list(base, start_after=start):
            stem = obj["Key"][len(base) :].removesuffix(".json")
            if stem.isdigit():
                latest = max(latest or 0, int(stem))
        if latest is None and start is not None:
            return self.versions(kind, name)[-1] if self.versions(kind, name) else None
        return latest

    def aliases(self, kind: str, name: str) -> dict[str, int]:
        """Named aliases of KIND/NAME (``latest`` included) -> version."""
        base = self._base(kind, name) + "aliases/"
        out: dict[str, int] = {}
        for obj in self.storage.list(base):
            alias = obj["Key"][len(base) :].removesuffix(".json")
            try:
                doc, _ = self.storage.get_json(obj["Key"])
                out[alias] = int(doc["version"])
            except ObjectNotFound:
                continue
        latest = self.latest_version(kind, name)
        if latest is not None:
            out[LATEST] = latest
        return out

    def _get_manifest(self, kind: str, name: str, version: int) -> dict[str, Any]:
        doc, _ = self.storage.get_json(self._manifest_key(kind, name, version))
        return doc

    def resolve(self, ref: str | Ref) -> Version:
        """The version a reference names.

        Raises:
            RegistryError: malformed reference, unknown name, version or alias (the message lists what exists).
        """
        r = ref if isinstance(ref, Ref) else Ref.parse(ref)
        if r.version is not None:
            number = r.version
        elif r.alias == LATEST:
            latest = self.latest_version(r.kind, r.name)
            if latest is None:
                raise RegistryError(f"{r.kind}/{r.name} has no versions{self._did_you_mean(r.kind, r.name)}")
            number = latest
        else:
            try:
                doc, _ = self.storage.get_json(self._alias_key(r.kind, r.name, r.alias))
            except ObjectNotFound:
                known = sorted(self.aliases(r.kind, r.name))
                if not known:
                    raise RegistryError(
                        f"{r.kind}/{r.name} has no versions{self._did_you_mean(r.kind, r.name)}"
                    ) from None
                raise RegistryError(
                    f"{r.kind}/{r.name} has no alias {r.alias!r} (aliases: {', '.join(known)})"
                ) from None
            number = int(doc["version"])
        try:
            manifest = self._get_manifest(r.kind, r.name, number)
        except ObjectNotFound:
            versions = self.versions(r.kind, r.name)
            have = f"versions: {_ranges(versions)}" if versions else "no versions"
            raise RegistryError(
                f"{r.kind}/{r.name} has no version {number} ({have}){self._did_you_mean(r.kind, r.name)}"
            ) from None
        return Version(manifest, self.storage.bucket, split=r.split)

    def _did_you_mean(self, kind: str, name: str) -> str:
        try:
            if kind not in self.kinds():
                return f"; kinds in the registry: {', '.join(self.kinds()) or 'none'}"
            names = self.names(kind)
        except StorageError:
            return ""
        return f"; {kind} names: {', '.join(names[:20])}" if names else ""

    def uris(self, ref: str | Ref) -> list[str]:
        """S3 URIs of a version's files (Ray Data reads dataset shards in place from these)."""
        v = self.resolve(ref)
        return [v.uri(f["path"]) for f in v.files]

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        """One row per KIND/NAME: latest version, number of versions, aliases, created, size."""
        rows = []
        for k in [kind] if kind else self.kinds():
            for n in self.names(k):
                versions = self.versions(k, n)
                if not versions:
                    continue
                latest = self._get_manifest(k, n, versions[-1])
                aliases = self.aliases(k, n)
                rows.append(
                    {
                        "ref": f"{k}/{n}",
                        "kind": k,
                        "name": n,
                        "latest": versions[-1],
                        "versions": len(versions),
                        "aliases": {a: v for a, v in sorted(aliases.items()) if a != LATEST},
                        "created": latest["created"],
                        "size": sum(f["size"] for f in latest["files"]),
                    }
                )
        return rows

    # ------------------------------------------------------------------ writing
    def create(
        self,
        kind: str,
        name: str,
        src: str | os.PathLike | None = None,
        *,
        files: dict[str, str | os.PathLike] | None = None,
        objects: dict[str, dict[str, Any]] | None = None,
        metadata: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        parents: Iterable[str | Ref] = (),
        license: str | None = None,
        source: str | None = None,
        creator: str | None = None,
        dedup: bool = True,
        progress: bool | None = None,
    ) -> Version:
        """Register a new version of KIND/NAME from a file or a folder (``src``) or a mapping of files.

        Files go up first under a fresh prefix; the manifest is created last, conditionally, so an
        interrupted call leaves no version. With ``dedup`` and identical files to an existing version, that
        version is returned with ``reused=True`` and nothing is uploaded.

        Args:
            files: {path inside the version: local path}; exclusive with ``src``.
            objects: {path inside the version: {"key", "sha256", "size"}}: objects already in the bucket (a data
                engine run's staged shards), copied into the version's prefix server-side, so that none of their
                bytes pass through this process. ``sha256`` and ``size`` are the writer's (it hashed the bytes it
                put); the size is checked against the copy, the sha256 by every verified read.
            parents: references this version was built from (lineage); resolved to exact versions.
            license, source: recorded in the manifest (required practice for imported weights).

        Raises:
            RegistryError: bad name, bad path, unknown parent, nothing to upload, a symbolic link as ``src`` or
                in ``files`` (links inside a folder are left out and listed in ``Version.skipped_links``).
        """
        validate_name(kind, "kind")
        validate_name(name)
        if src is not None and files is not None:
            raise RegistryError("give either a source path or a mapping of files")
        if src is None and files is None and not objects:
            raise RegistryError("give a source path, a mapping of files or objects in the bucket")
        skipped_links: list[str] = []
        local = (
            collect_files(src, skipped_links)
            if src is not None
            else {validate_relpath(k): Path(v) for k, v in (files or {}).items()}
        )
        stored = {validate_relpath(k): v for k, v in (objects or {}).items()}
        both = sorted(set(local) & set(stored))
        if both:
            raise RegistryError(f"paths given both as files and as objects: {', '.join(both[:5])}")
        for rel, p in local.items():
            _refuse_link(Path(p), f"file for {rel}:")
            if not Path(p).is_file():
                raise RegistryError(f"{p} (for {rel}) is not a file")
        entries = []
        for rel, p in sorted(local.items()):
            digest, size = sha256_file(p)
            entries.append({"path": rel, "sha256": digest, "size": size})
        for rel, obj in sorted(stored.items()):
            entries.append({"path": rel, "sha256": str(obj["sha256"]), "size": int(obj["size"])})
        entries.sort(key=lambda e: e["path"])
        chash = content_hash(entries)
        parent_refs = sorted({self.resolve(p).ref for p in parents})

        content_key = f"{self._base(kind, name)}content/{chash}.json"
        if dedup:
            try:
                doc, _ = self.storage.get_json(content_key)
                existing = self.resolve(f"{kind}/{name}@{int(doc['version'])}")
                if content_hash(existing.files) == chash:
                    existing.reused = True
                    existing.skipped_links = skipped_links
                    return existing
            except (ObjectNotFound, RegistryError):
                pass

        upload_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        prefix = f"{self._base(kind, name)}objects/{upload_id}/"

        def adopt(item: tuple[str, dict[str, Any]]) -> None:
            rel, obj = item
            self.storage.copy(obj["key"], prefix + rel, int(obj["size"]))
            copied = int(self.storage.head(prefix + rel)["ContentLength"])
            if copied != int(obj["size"]):
                raise IntegrityError(
                    f"{obj['key']} copied to {prefix + rel} holds {copied} bytes, not the {obj['size']} declared"
                )

        if stored:  # server-side copies, several at once (the client is thread-safe)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=max(1, self.storage.config.max_concurrency)) as pool:
                list(pool.map(adopt, sorted(stored.items())))
        total = sum(e["size"] for e in entries if e["path"] in local)
        with byte_bar(total, f"upload {kind}/{name}", progress) as bar:
            for e in entries:
                if e["path"] not in local:
                    continue
                key = prefix + e["path"]
                if e["size"] >= self.storage.config.multipart_threshold_mb * 1024 * 1024:
                    self.storage.upload_file(local[e["path"]], key, progress=False)
                else:
                    self.storage.put_bytes(key, Path(local[e["path"]]).read_bytes())
                bar.update(e["size"])

        token = uuid.uuid4().hex
        manifest: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "kind": kind,
            "name": name,
            "version": None,
            "prefix": prefix,
            "files": entries,
            "content_sha256": chash,
            "metadata": metadata or {},
            "metrics": metrics or {},
            "parents": parent_refs,
            "license": license,
            "source": source,
            "created": _now(),
            "creator": creator or default_creator(),
            "write_token": token,
        }
        number = self._claim_version(kind, name, manifest)
        # Indexes after the manifest: if these writes are lost, the version is still whole and valid.
        self.storage.put_json(content_key, {"version": number})
        self.storage.put_json(self._base(kind, name) + "latest-hint.json", {"version": number})
        for parent in parent_refs:
            pr = Ref.parse(parent)
            edge = self._lineage_prefix(pr.kind, pr.name, pr.version) + f"{kind}/{name}/{number:010d}"
            self.storage.put_bytes(edge, b"")
        return Version(manifest, self.storage.bucket, skipped_links=skipped_links)

    def _claim_version(self, kind: str, name: str, manifest: dict[str, Any]) -> int:
        number = (self.latest_version(kind, name) or 0) + 1
        for _ in range(1000):
            manifest["version"] = number
            try:
                self.storage.put_json(self._manifest_key(kind, name, number), manifest, if_none_match=True)
                return number
            except PreconditionFailed:
                # Our own earlier attempt may have landed before a retried request (the response was lost).
                try:
                    if self._get_manifest(kind, name, number).get("write_token") == manifest["write_token"]:
                        return number
                except ObjectNotFound:
                    pass
                number = max(number, self.latest_version(kind, name) or 0) + 1
        raise RegistryError(f"could not claim a version number for {kind}/{name} after 1000 tries")

    def set_alias(
        self,
        ref: str | Ref,
        alias: str,
        *,
        creator: str | None = None,
        expected: int | None | object = ANY_VERSION,
    ) -> AliasMove:
        """Point ALIAS of the reference's KIND/NAME at its version (compare-and-swap, history kept).

        Args:
            expected: the version the alias must point at now for the move to happen (``None``: the alias must not
                exist yet). The check and the write are one conditional write, so a concurrent mover makes this
                call fail rather than be overwritten. Left out, the move happens whatever the alias points at.

        Raises:
            AliasConflict: ``expected`` was given and the alias points elsewhere (nothing moved).
            RegistryError: bad alias, ``latest``, unknown reference.
        """
        validate_alias(alias)
        if alias == LATEST:
            raise RegistryError("'latest' is automatic (the highest version) and cannot be moved")
        v = self.resolve(ref)
        key = self._alias_key(v.kind, v.name, alias)
        by = creator or default_creator()
        token = uuid.uuid4().hex
        for attempt in range(200):
            try:
                doc, etag = self.storage.get_json(key)
            except ObjectNotFound:
                doc, etag = None, None
            history = (doc or {}).get("history", [])
            if attempt and history and history[-1].get("token") == token:
                # An earlier attempt landed but its answer was lost: it is done, don't record it twice.
                last = history[-1]
                return AliasMove(alias, last["from"], last["to"], last["by"], last["at"])
            prev = int(doc["version"]) if doc else None
            if expected is not ANY_VERSION and prev != expected:
                raise AliasConflict(
                    f"{v.kind}/{v.name}@{alias} points at "
                    f"{'no version' if prev is None else f'version {prev}'}, expected "
                    f"{'none' if expected is None else f'version {expected}'}: it moved meanwhile; nothing changed",
                    current=prev,
                )
            move = AliasMove(alias, prev, v.version, by, _now())
            history = history + [{"from": prev, "to": v.version, "by": by, "at": move.at, "token": token}]
            new = {"alias": alias, "version": v.version, "history": history[-_ALIAS_HISTORY_KEEP:]}
            try:
                if etag is None:
                    self.storage.put_json(key, new, if_none_match=True)
                else:
                    self.storage.put_json(key, new, if_match=etag)
                return move
            except PreconditionFailed:
                time.sleep(random.uniform(0, 0.02 * min(attempt + 1, 10)))
        raise RegistryError(f"could not move alias {alias!r} of {v.kind}/{v.name}: too much contention")

    def alias_history(self, kind: str, name: str, alias: str) -> list[dict[str, Any]]:
        try:
            doc, _ = self.storage.get_json(self._alias_key(kind, name, validate_alias(alias)))
        except ObjectNotFound:
            raise RegistryError(f"{kind}/{name} has no alias {alias!r}") from None
        return doc.get("history", [])

    # ------------------------------------------------------------------ downloading
    def download(self, ref: str | Ref, dest: str | os.PathLike, *, progress: bool | None = None) -> Path:
        """Download every file of a version under folder ``dest``, verifying sha256 and size.

        Raises:
            IntegrityError: a file's bytes differ from its manifest (nothing corrupt is left in ``dest``).
        """
        v = self.resolve(ref)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        with byte_bar(v.size(), f"download {v.ref}", progress) as bar:
            for f in v.files:
                target = (dest / validate_relpath(f["path"])).resolve()
                if root not in target.parents:
                    raise RegistryError(f"file path {f['path']!r} of {v.ref} escapes {dest}")
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
                os.close(fd)
                try:
                    self.storage.download_file(v.key(f["path"]), tmp, progress=False)
                    digest, size = sha256_file(tmp)
                    if digest != f["sha256"] or size != f["size"]:
                        raise IntegrityError(
                            f"{v.ref}: file {f['path']!r} is corrupt in the object store "
                            f"(sha256 {digest[:12]}..., {size} bytes; manifest says {f['sha256'][:12]}..., "
                            f"{f['size']} bytes); not written to {dest}"
                        )
                    os.replace(tmp, target)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                bar.update(f["size"])
        return dest

    def read_bytes(self, ref: str | Ref | Version, path: str) -> bytes:
        """One file of a version, verified."""
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        entry = next((f for f in v.files if f["path"] == path), None)
        if entry is None:
            names = ", ".join(f["path"] for f in v.files[:10])
            raise RegistryError(f"{v.ref} has no file {path!r} (files: {names})")
        data, _ = self.storage.get_bytes(v.key(path))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise IntegrityError(f"{v.ref}: file {path!r} is corrupt in the object store (sha256 mismatch)")
        return data

    # ------------------------------------------------------------------ lineage
    def children(self, ref: str | Ref) -> list[str]:
        """Exact references of the versions built from this one."""
        v = self.resolve(ref)
        base = self._lineage_prefix(v.kind, v.name, v.version)
        out = []
        for obj in self.storage.list(base):
            kind, name, num = obj["Key"][len(base) :].split("/")
            out.append(f"{kind}/{name}@{int(num)}")
        return sorted(out)

    def lineage(self, ref: str | Ref, depth: int = 10) -> dict[str, Any]:
        """Ancestors (what it was built from) and descendants (what was built from it), as trees."""
        v = self.resolve(ref)

        def up(r: str, d: int) -> list[dict[str, Any]]:
            if d == 0:
                return []
            return [{"ref": p, "parents": up(p, d - 1)} for p in self.resolve(r).parents]

        def down(r: str, d: int) -> list[dict[str, Any]]:
            if d == 0:
                return []
            return [{"ref": c, "children": down(c, d - 1)} for c in self.children(r)]

        return {"ref": v.ref, "parents": up(v.ref, depth), "children": down(v.ref, depth)}

    # ------------------------------------------------------------------ garbage collection
    def gc(self, *, dry_run: bool = True, grace_s: float = 3600.0) -> GcReport:
        """Find (and unless ``dry_run``, delete) files under ``objects/`` that no manifest references.

        Files younger than ``grace_s`` are left alone: an import may still be uploading them.
        """
        report = GcReport()
        now = time.time()
        for kind in self.kinds():
            for name in self.names(kind):
                base = self._base(kind, name)
                referenced = set()
                for number in self.versions(kind, name):
                    referenced.add(self._get_manifest(kind, name, number)["prefix"])
                for obj in self.storage.list(base + "objects/"):
                    upload = obj["Key"][len(base + "objects/") :].split("/", 1)[0]
                    if f"{base}objects/{upload}/" in referenced:
                        continue
                    if now - obj["LastModified"].timestamp() < grace_s:
                        report.kept_young += 1
                        continue
                    report.orphans.append({"key": obj["Key"], "size": obj["Size"]})
        if not dry_run and report.orphans:
            self.storage.delete([o["key"] for o in report.orphans])
            report.deleted = True
        return report


def _ranges(nums: list[int]) -> str:
    if not nums:
        return ""
    out, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


__all__ = [
    "AliasMove",
    "GcReport",
    "IntegrityError",
    "KNOWN_KINDS",
    "Ref",
    "Registry",
    "RegistryError",
    "Version",
    "validate_alias",
    "validate_name",
]
