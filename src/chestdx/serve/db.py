"""Where results live: one `studies` table through SQLAlchemy (SQLite by default, PostgreSQL by URL).

The service keeps no state in the process, so any number of copies behind a load balancer
share this database. Images are stored only when the operator opts in, and then without the
DICOM tags that identify a person (see `deid`); the uploaded file name is never stored (it
often carries a patient name), only the SHA-256 of the upload.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, DateTime, Float, LargeBinary, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=lambda: datetime.now(timezone.utc))
    model: Mapped[str] = mapped_column(String(128), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    input_format: Mapped[str] = mapped_column(String(16))
    prediction: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[dict] = mapped_column(JSON)  # probabilities, lesions, timings, image metadata
    image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    image_media_type: Mapped[str | None] = mapped_column(String(64), nullable=True)

    def as_dict(self) -> dict:
        return {"id": self.id, "created": self.created.isoformat(), "model": self.model, "sha256": self.sha256,
                "input_format": self.input_format, "prediction": self.prediction, "threshold": self.threshold,
                **self.result, "image_stored": self.image is not None}


class Database:
    def __init__(self, url: str):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_wal)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def add(self, **fields) -> Study:
        study = Study(**fields)
        with self.sessions.begin() as session:
            session.add(study)
        return study

    def get(self, study_id: str) -> Study | None:
        with Session(self.engine) as session:
            return session.get(Study, study_id)

    def ids(self) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(Study.id)))


def _sqlite_wal(connection, _record):
    # Write-ahead logging lets readers and one writer work at once (several worker threads).
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
