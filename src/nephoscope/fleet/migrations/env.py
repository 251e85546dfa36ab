"""Alembic environment: run the fleet migrations on the URL (or connection) `fleet.db.migrate` passes."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from nephoscope.fleet.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
