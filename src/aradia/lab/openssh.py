"""The OpenSSH variant of the test guests: Debian's ``sshd`` (package ``openssh-server`` and its
library closure) instead of dropbear, for tests that must see both daemons (the honeypot's).

No debug symbols: the binary as Debian ships it. Password logins go through ``crypt`` (``UsePAM
no``), root may log in, privilege separation runs as the ``sshd`` user in ``/run/sshd``; the host
key is an ed25519 key made by the host's ``ssh-keygen`` when the image is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from aradia.lab import GuestError
from aradia.lab.debian import run_tool

PACKAGES = ("openssh-server",)
"""What the variant adds to the guest userland (with its library closure)."""

START = "mkdir -p /run/sshd && chmod 755 /run/sshd && /usr/sbin/sshd -f /etc/ssh/sshd_config"
"""The line of ``/init`` that starts the daemon (an absolute path: sshd re-executes itself per connection)."""

SSHD_CONFIG = b"""Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PidFile /run/sshd.pid
PrintMotd no
PrintLastLog no
UseDNS no
Subsystem sftp internal-sftp
"""


class Tree(Protocol):
    """What this needs of :class:`~aradia.lab.initramfs.Rootfs` (which imports this module)."""

    def add_program(self, dest: str, candidates: Iterable[str]) -> None:
        """Copy a userland binary with its shared-library closure."""

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        """Add (or replace) a regular file."""

    def dir(self, path: str, perm: int = 0o755) -> None:
        """Add a directory (and its parents)."""


def add_openssh(rootfs: Tree, work: Path) -> str:
    """Put sshd, its config, a host key and the privilege-separation user into ``rootfs``; the host
    key's public line."""
    rootfs.add_program("usr/sbin/sshd", ["usr/sbin/sshd"])
    rootfs.file("etc/ssh/sshd_config", SSHD_CONFIG)
    key = work / "ssh_host_ed25519_key"
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "aradia-guest", "-f", str(key)],
             timeout=60, what="ssh-keygen (host key of the OpenSSH guest)")
    rootfs.file("etc/ssh/ssh_host_ed25519_key", key.read_bytes(), 0o600)
    pub = key.with_suffix(".pub").read_text().split()
    key.unlink()
    key.with_suffix(".pub").unlink()
    if len(pub) < 2 or pub[0] != "ssh-ed25519":
        raise GuestError(f"ssh-keygen made no ed25519 public key: {pub!r}")
    rootfs.file("etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n"
                b"sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n")
    rootfs.file("etc/group", b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    rootfs.dir("var/empty", 0o755)
    return " ".join(pub[:2])
