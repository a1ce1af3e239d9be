"""Wire protocols spoken to QEMU (QMP, the GDB remote serial protocol); no guest meaning here."""
