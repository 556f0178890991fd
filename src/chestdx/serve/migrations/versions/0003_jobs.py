"""Asynchronous jobs: a volume (or series) prediction that runs after its request has been answered.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created", TZ, nullable=False, index=True),
        sa.Column("started", TZ, nullable=True),
        sa.Column("finished", TZ, nullable=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("heatmap", sa.Boolean, nullable=False),
        sa.Column("org_id", sa.String(36), nullable=True, index=True),
        sa.Column("created_by", sa.String(160), nullable=True),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("lease_until", TZ, nullable=True),
        sa.Column("study_id", sa.String(36), nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("jobs")
