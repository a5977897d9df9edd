"""The ledger's per-replica breakdown: device-seconds and device cost by replica for a request that several replicas
served (NULL for the rest, so existing rows need no backfill).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = ("device_seconds_by_replica", "cost_device_by_replica")


def upgrade() -> None:
    for name in _COLUMNS:
        op.add_column("ledger", sa.Column(name, sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:  # SQLite drops a column by copying the table
        for name in _COLUMNS:
            batch.drop_column(name)
