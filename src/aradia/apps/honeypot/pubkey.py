"""Public-key logins as the ssh daemon itself reports them: the lines it hands to ``syslog``.

Neither daemon exports a function that sees the client's key (no debug symbols: dynamic symbols
only), but both log a public-key login with the key's fingerprint, formatted before the call, through
libc's ``syslog`` (``__syslog_chk`` in these fortified builds: priority, flag, format, then the text):

* dropbear: ``Pubkey auth succeeded for 'USER' with TYPE key FP from ADDR`` and
  ``Pubkey auth bad signature for 'USER' with key FP from ADDR`` (format ``%s``);
* OpenSSH's monitor: ``Accepted publickey for USER from ADDR port N ssh2: TYPE FP`` (and
  ``Failed publickey ...`` when ``LogLevel`` is ``VERBOSE`` or above; format ``%.500s``).

So a key is recorded where the daemon exposes it: a key it accepted (dropbear: or whose signature
failed). A key the daemon does not know is not logged at its default level, so it is not recorded.
The probe runs whether or not a syslog daemon listens: ``syslog`` is called either way.
"""

from __future__ import annotations

import re
from typing import Any

SYSLOG = "libc.so.6:__syslog_chk"
SYSLOG_ARGS = "priority:int,flag:int,format:str,message:str"
#: formats the daemons pass the already formatted line with (``message`` is then the whole text)
LINE_FORMATS = frozenset({"%s", "%.500s"})

_FP = r"(?P<fp>SHA256:[A-Za-z0-9+/]+=*|(?:MD5|md5)[: ][0-9a-f]{2}(?::[0-9a-f]{2}){15})"
_DROPBEAR = re.compile(r"Pubkey auth (?P<verdict>succeeded|bad signature) for '(?P<user>[^']*)' with "
                       r"(?:(?P<type>\S+) )?key " + _FP + r" from ")
_OPENSSH = re.compile(r"(?P<verdict>Accepted|Failed|Partial) publickey for (?:invalid user )?(?P<user>\S*) "
                      r"from \S+ port \d+ ssh2: (?P<type>\S+) " + _FP + r"$")


def pubkey_attempt(fmt: str | None, message: str | None) -> dict[str, Any] | None:
    """The public-key attempt a daemon's log line reports (``user``, ``key_type``, ``fingerprint``,
    ``accepted``), or None for any other line."""
    if fmt not in LINE_FORMATS or not message:
        return None
    m = _DROPBEAR.match(message) or _OPENSSH.match(message)
    if m is None:
        return None
    return {"user": m["user"], "key_type": m["type"], "fingerprint": m["fp"],
            "accepted": m["verdict"] in ("succeeded", "Accepted", "Partial")}
