"""Infrastructure under the front-ends: crash-safe checkpoint files and the safe loader
(`checkpoint`, `restricted_pickle`), the sharded average's partition and broadcast (`sharding`),
the program-building operations of the static EMA (`program_ops`)."""
