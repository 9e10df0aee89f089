"""Alembic's environment: runs the migrations on the connection `flowops.statedb` hands over.

That connection is already inside one transaction holding the migration lock, so the whole upgrade
commits or rolls back as one: PostgreSQL runs DDL in transactions, and so does SQLite when the
transaction is begun explicitly (statedb does). Batch mode lets SQLite alter tables by copying.
"""

from alembic import context

from flowops.statedb import METADATA

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=METADATA,
    transactional_ddl=True,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
