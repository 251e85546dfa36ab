"""The first fleet schema: tenants, hosts, VMs, tokens, scans, findings.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

J = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    """Create every table of the first schema."""
    op.create_table("tenants", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.String(200), nullable=False, unique=True))
    op.create_table("hosts", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.String(200), nullable=False, unique=True))
    op.create_table("vms", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("host_id", sa.Integer, sa.ForeignKey("hosts.id"), nullable=False),
                    sa.Column("name", sa.String(300), nullable=False),
                    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=True),
                    sa.Column("high_risk", sa.Boolean, nullable=False),
                    sa.Column("latest_scan_id", sa.Integer, nullable=True),
                    sa.Column("risk", J, nullable=False),
                    sa.UniqueConstraint("host_id", "name"))
    op.create_table("tokens", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("digest", sa.String(64), nullable=False, unique=True),
                    sa.Column("scope", sa.String(16), nullable=False),
                    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=True),
                    sa.Column("host_id", sa.Integer, sa.ForeignKey("hosts.id"), nullable=True),
                    sa.Column("label", sa.String(200), nullable=False),
                    sa.Column("created", sa.Float, nullable=False))
    op.create_table("scans", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
                    sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
                    sa.Column("started", sa.Float, nullable=False), sa.Column("finished", sa.Float, nullable=False),
                    sa.Column("received", sa.Float, nullable=False), sa.Column("status", sa.String(32), nullable=False),
                    sa.Column("methods", J, nullable=False), sa.Column("summary", J, nullable=False),
                    sa.Column("document", J, nullable=False))
    op.create_index("scans_vm_received", "scans", ["vm_id", "id"])
    op.create_table("findings", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("scan_id", sa.Integer, sa.ForeignKey("scans.id", ondelete="CASCADE"), nullable=False),
                    sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), nullable=False),
                    sa.Column("time", sa.Float, nullable=False), sa.Column("kind", sa.String(100), nullable=False),
                    sa.Column("severity", sa.String(32), nullable=False), sa.Column("title", sa.Text, nullable=False),
                    sa.Column("evidence", J, nullable=False))
    op.create_index("findings_vm_time", "findings", ["vm_id", "time"])


def downgrade() -> None:
    """Drop every table of the first schema."""
    for table in ("findings", "scans", "tokens", "vms", "hosts", "tenants"):
        op.drop_table(table)
