"""How workers reach the parameter server. Every transport's client has the same interface: ``mailbox``,
``initialize``, ``commit``, ``pull``, ``get_state``, ``put_state``, ``stats`` and ``close`` (see :class:`~lightning_adag.transports.shm.ShmClient`)."""
