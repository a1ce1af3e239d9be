"""The SSH honeypot monitor: every ssh session's credentials, commands, terminal, files and connections,
recorded from outside the guest (see :mod:`aradia.apps.honeypot.monitor`)."""
