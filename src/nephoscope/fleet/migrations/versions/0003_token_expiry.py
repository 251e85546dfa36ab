"""An optional expiry per token.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `tokens.expires` (Unix time; NULL: the token never expires, as every earlier token)."""
    op.add_column("tokens", sa.Column("expires", sa.Float, nullable=True))


def downgrade() -> None:
    """Drop `tokens.expires`."""
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("expires")
