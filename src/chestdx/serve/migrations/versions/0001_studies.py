"""The studies table, as the service created it before migrations existed.

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
        "studies",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("input_format", sa.String(16), nullable=False),
        sa.Column("prediction", sa.String(64), nullable=False),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("result", sa.JSON, nullable=False),
        sa.Column("image", sa.LargeBinary, nullable=True),
        sa.Column("image_media_type", sa.String(64), nullable=True),
    )
    op.create_index("ix_studies_model", "studies", ["model"])
    op.create_index("ix_studies_sha256", "studies", ["sha256"])


def downgrade() -> None:
    op.drop_table("studies")
