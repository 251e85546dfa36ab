"""Filters and notices per VM, as each host's sensor reports them.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

J = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    """Create the filter, filter-audit and notice tables; record when a VM's response state was last pushed."""
    op.add_column("vms", sa.Column("response_at", sa.Float, nullable=True))
    op.create_table("vm_filters", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
                    sa.Column("mitigation", sa.String(200), nullable=False),
                    sa.Column("cve", sa.String(100), nullable=False),
                    sa.Column("applied_at", sa.Float, nullable=False), sa.Column("data", J, nullable=False))
    op.create_index("vm_filters_vm", "vm_filters", ["vm_id"])
    op.create_table("vm_filter_audit", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
                    sa.Column("source_id", sa.Integer, nullable=False), sa.Column("at", sa.Float, nullable=False),
                    sa.Column("action", sa.String(32), nullable=False),
                    sa.Column("cve", sa.String(100), nullable=False),
                    sa.Column("data", J, nullable=False), sa.UniqueConstraint("vm_id", "source_id"))
    op.create_index("vm_filter_audit_vm_at", "vm_filter_audit", ["vm_id", "at"])
    op.create_table("vm_notices", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
                    sa.Column("source_id", sa.Integer, nullable=False), sa.Column("created", sa.Float, nullable=False),
                    sa.Column("status", sa.String(32), nullable=False), sa.Column("data", J, nullable=False),
                    sa.UniqueConstraint("vm_id", "source_id"))
    op.create_index("vm_notices_vm_created", "vm_notices", ["vm_id", "created"])


def downgrade() -> None:
    """Drop the response tables and the VM column."""
    for table in ("vm_notices", "vm_filter_audit", "vm_filters"):
        op.drop_table(table)
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("response_at")
