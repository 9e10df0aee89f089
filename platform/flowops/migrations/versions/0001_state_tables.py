"""The state tables: label inbox, events, rollouts, documents, pipelines, job events, drift
reports, ledger totals.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("task_id", sa.String, primary_key=True),
        sa.Column("image_id", sa.String, nullable=False),
        sa.Column("label", sa.String, nullable=False),
        sa.Column("source", sa.String, nullable=False),
        sa.Column("annotator", sa.String, nullable=False, server_default=""),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("used_in", sa.String),
    )
    op.create_index("labels_unused", "labels", ["used_in", "received_at"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String, unique=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("event", sa.String, nullable=False),
        sa.Column("rollout", sa.String),
        sa.Column("record", sa.JSON, nullable=False),
    )
    op.create_index("ix_events_rollout", "events", ["rollout"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("record", sa.JSON, nullable=False),
    )
    op.create_table(
        "documents",
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("body", sa.JSON, nullable=False),
    )
    op.create_table(
        "pipelines",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("record", sa.JSON, nullable=False),
    )
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("event", sa.String, nullable=False),
        sa.Column("workload", sa.String, nullable=False),
        sa.Column("duration_s", sa.Float),
    )
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("model", sa.String, nullable=False),
        sa.Column("drifted", sa.Boolean, nullable=False),
        sa.Column("report", sa.JSON, nullable=False),
    )
    op.create_table(
        "ledger_totals",
        sa.Column("app", sa.String, primary_key=True),
        sa.Column("version", sa.String, primary_key=True),
        sa.Column("totals", sa.JSON, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
