"""The profile cache: what :func:`aradia.linux.profile.find_profile` learnt about a kernel build.

Under ``$ARADIA_CACHE/profiles/<build id>/`` (default ``~/.cache/aradia``): ``profile.json`` (release,
banner, the kallsyms table layout *relative to the kernel base*, digests), ``names.bin`` (the decoded
kallsyms names and types) and ``btf-index.bin``; ``by-kallsyms/<digest>`` names the build of a kernel
found by scanning (no VMCOREINFO, so no build ID until kallsyms is read). Nothing that changes per
boot is cached, and every part is used only when the digest of the bytes it was decoded from matches
the bytes in RAM now.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from aradia.cache import cache_dir
from aradia.errors import AradiaError
from aradia.linux import kallsyms as ks
from aradia.linux.btf import Btf

PROFILE_FORMAT = 1
"""The version of ``profile.json``; a cached profile of another format is ignored."""

_BUILD_ID = re.compile(r"[0-9a-f]{8,128}")


def valid_build_id(build_id: str) -> bool:
    """Whether ``build_id`` is a build ID the cache keys directories by (8..128 lowercase hex digits)."""
    return _BUILD_ID.fullmatch(build_id) is not None


class ProfileCache:
    """``<root>/<build id>/``: ``profile.json``, ``names.bin`` (kallsyms), ``btf-index.bin``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir("profiles")

    def _dir(self, build_id: str) -> Path:
        if not valid_build_id(build_id):
            raise AradiaError(f"bad build id {build_id!r}")
        return self.root / build_id

    def load_meta(self, build_id: str) -> dict[str, Any] | None:
        """The cached profile description, or None."""
        try:
            meta = json.loads((self._dir(build_id) / "profile.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("format") != PROFILE_FORMAT:
            return None
        return meta

    def load_names(self, build_id: str, digest: str) -> ks.NameTable | None:
        """Cached kallsyms names and types decoded from bytes with ``digest``, or None."""
        try:
            d = marshal.loads((self._dir(build_id) / "names.bin").read_bytes())
            if d.get("digest") != digest:
                return None
            return ks.NameTable(list(d["names"]), str(d["types"]), digest)
        except (OSError, ValueError, EOFError, TypeError, KeyError, AttributeError):
            return None

    def load_btf_index(self, build_id: str) -> dict[str, Any] | None:
        """The cached BTF index (checked against the blob's digest by :class:`Btf`), or None."""
        try:
            return Btf.load_index((self._dir(build_id) / "btf-index.bin").read_bytes())
        except OSError:
            return None

    def find_by_kallsyms(self, digest: str) -> str | None:
        """Build id of the cached kernel whose kallsyms bytes have ``digest`` (kernels found by scan)."""
        try:
            bid = (self.root / "by-kallsyms" / digest).read_text().strip()
        except OSError:
            return None
        return bid if valid_build_id(bid) else None

    def store(self, build_id: str, meta: dict[str, Any], names: ks.NameTable | None,
              btf: Btf | None) -> None:
        """Write (atomically, file by file) what was learnt; failures to write are ignored."""
        with contextlib.suppress(OSError):
            d = self._dir(build_id)
            d.mkdir(parents=True, exist_ok=True)
            if names is not None:
                _atomic_write(d / "names.bin", marshal.dumps(
                    {"digest": names.digest, "names": names.names, "types": names.types}))
            if btf is not None:
                _atomic_write(d / "btf-index.bin", btf.dump_index())
            _atomic_write(d / "profile.json", json.dumps(meta, indent=1, sort_keys=True).encode())
            digest = meta.get("kallsyms_digest")
            if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{32}", digest):
                alias = self.root / "by-kallsyms"
                alias.mkdir(exist_ok=True)
                _atomic_write(alias / digest, build_id.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


__all__ = ["PROFILE_FORMAT", "ProfileCache", "valid_build_id"]
