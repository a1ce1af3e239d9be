"""The insider guard (``aradia guard``): protected files and forbidden programs, decided from outside
the guest at the kernel's security hooks on the objects the kernel resolved (see :mod:`.guard`)."""
