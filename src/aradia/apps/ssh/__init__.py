"""SSH forensics from outside the guest: session keys from the daemon's memory (``keys``), QEMU's own
network capture (``aradia.machine.capture``), and decryption of the captured sessions (``decrypt``)."""
