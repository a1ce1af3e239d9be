"""The insider guard's test scene in a guest: a protected tree, an updater, a forbidden program, and
``aradia guard`` running against it while the insider acts as root over ssh."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aradia.lab.launcher import Guest
from cli_runner import cli_argv, interrupt

#: /srv/app with a config and a bin/ directory; a hard link to the config made before the guard
#: starts, a bind mount of the tree; the allowed updater /usr/local/bin/deploy (a copy of bash: the
#: allow rule names the program, which the guard compares as a file); nc as a file of its own
#: (busybox's applets are all links to one busybox, which a forbid rule would forbid whole); appd,
#: the service allowed to run nc.
SCENE = """
umount /mnt/app-bind 2>/dev/null; rm -rf /srv/app /srv/app-moved /root/hardlink /root/stolen /root/evil /tmp/cfglink
mkdir -p /srv/app/bin /usr/local/bin /mnt/app-bind
printf 'listen=8080\\nsecret=s3cr3t\\n' > /srv/app/config
printf '#!/bin/sh\\necho run\\n' > /srv/app/bin/run
chmod 755 /srv/app/bin/run
ln /srv/app/config /root/hardlink
mount --bind /srv/app /mnt/app-bind
cp /bin/bash /usr/local/bin/deploy
rm -f /usr/local/bin/nc; cp /bin/busybox /usr/local/bin/nc
printf '#!/bin/bash\\n/usr/local/bin/nc -w 2 127.0.0.1 22 </dev/null | head -c 16; echo; echo appd-nc=$?\\n' \\
  > /usr/local/bin/appd
chmod 755 /usr/local/bin/appd
if [ -x /tmp/xattr ]; then /tmp/xattr set /srv/app/config trusted.keep 1; fi
"""

POLICY = """
[[protect]]
path = "/srv/app"
action = "{action}"
allow = [{{ comm = "deployer" }}, {{ exe = "/usr/local/bin/deploy" }}]
[[forbid]]
exe = "/usr/local/bin/nc"
action = "{action}"
allow = [{{ parent_comm = "appd" }}]
"""

#: What the guest says about the tree: every file's hash, ls -li of everything (the bind mount and
#: the hard link included; modification times to the nanosecond) and the config's extended attributes.
TRUTH = ("cd /srv/app && find . -type f | sort | xargs sha256sum; ls -liR --full-time /srv/app;"
         " ls -li /root/hardlink; ls -liR /mnt/app-bind; if [ -x /tmp/xattr ]; then /tmp/xattr list /srv/app/config; fi")


def set_scene(guest: Guest) -> str:
    """Build the scene (anew) and return the tree's truth."""
    guest.run(SCENE)
    return guest.run(TRUTH)


def write_policy(path: Path, action: str) -> Path:
    """The scene's policy with ``action`` (block or alert) for every rule."""
    path.write_text(POLICY.format(action=action))
    return path


@contextmanager
def guarding(guest: Guest, policy: Path, *extra: str,
             warnings: list[str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``aradia guard --json`` against the guest while the block runs; the process (armed when the
    block starts; the warnings it printed before go to ``warnings``). Ended with SIGINT unless the
    block ended it."""
    p = subprocess.Popen(cli_argv("guard", "--vm", f"qmp:{guest.qmp_path}", "--policy", str(policy), "--json",
                                  *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        while line.startswith("aradia:") and "error" not in line:
            if warnings is not None:
                warnings.append(line.rstrip("\n"))
            line = p.stderr.readline()
        assert line.startswith(f"guarding qmp:{guest.qmp_path} with {policy}"), line + p.stderr.read()
        yield p
    finally:
        interrupt(p)


def alerts_of(p: subprocess.Popen[str]) -> tuple[list[dict[str, Any]], str]:
    """The records an ended guard printed and its stderr."""
    out, err = p.communicate(timeout=60)
    return [json.loads(x) for x in out.splitlines()], err


def attempt(guest: Guest, cmd: str) -> tuple[str, int, str]:
    """Run ``cmd`` over ssh as root with bash; (the session's client address ``IP PORT``, exit status,
    output with stderr). The client address is the session's own $SSH_CLIENT."""
    out = guest.ssh(f"echo \"@@ $SSH_CLIENT @@\"; ( {cmd} ) 2>&1; echo \"@@rc=$?\"", timeout=120, check=False)
    head, _, rest = out.partition("\n")
    body, _, rc = rest.rpartition("@@rc=")
    client = head.strip("@ \n").rsplit(" ", 1)[0]
    return client, int(rc.strip()), body


def wait_for(cond: Any, timeout: float = 30) -> bool:
    """Poll ``cond()`` until true or ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return bool(cond())
