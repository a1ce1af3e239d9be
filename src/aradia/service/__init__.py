"""``aradia serve``: one owner per VM, a versioned HTTP API, tenants, policy, audit, an event store
(SQLite) and a bus (NATS JetStream).

Modules: ``schema`` (the one event record), ``config`` (the TOML file), ``policy`` (tokens, tenants,
rates), ``store`` (SQLite: events, audit, stored traces), ``bus`` (JetStream: events out, commands in,
the fleet aggregator), ``owner`` (a VM's connections and its shared tracer), ``operations`` (every
operation with its policy check and audit row, used by HTTP and the bus alike), ``api`` (FastAPI
routers), ``server`` (uvicorn, TLS, the process).
"""
