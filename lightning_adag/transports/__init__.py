"""How workers reach the parameter server. Every transport's client has the same interface: ``mailbox``,
``initialize``, ``commit``, ``pull``, ``stats`` and ``close`` (see :class:`~lightning_adag.transports.shm.ShmClient`)."""
