"""The state database's schema: Alembic migrations (`env.py`, `versions/`) that `flowops.statedb`
runs in code (no alembic.ini). A change of schema is a new file in `versions/` whose
`down_revision` is the newest file's `revision`; released revisions are never edited."""
