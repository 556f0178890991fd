"""Where results live: studies, organisations, users, API keys, sessions, the audit log and
asynchronous jobs, through SQLAlchemy (SQLite by default, PostgreSQL by URL), the schema kept by
Alembic migrations.

The service keeps no state in the process, so any number of copies behind a load balancer
share this database. Images are stored only when the operator opts in, and then de-identified
(see `deid`); the uploaded file name is never stored (it often carries a patient name), only
the SHA-256 of the upload. Secrets are stored only as hashes (see `auth`). A job row holds no
upload and no file name: the bytes wait in a temporary file of the process running the job
(`chestdx.serve.jobs`); the row holds its state, lease, result and error.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, create_engine,
                        delete, event, or_, select, update)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _uuid() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class Organisation(Base):
    __tablename__ = "organisations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))  # argon2id, encoded with its parameters
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)  # shown in listings and the audit log
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the whole key
    name: Mapped[str] = mapped_column(String(128))
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated: predict, read, admin
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LoginSession(Base):
    __tablename__ = "sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the cookie's token
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    actor: Mapped[str] = mapped_column(String(160))  # "user:alice" or "key:cdx_ab12cd34"
    org_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    action: Mapped[str] = mapped_column(String(32))  # create, read, login, logout, login_failed, ...
    study_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    detail: Mapped[str | None] = mapped_column(String(256), nullable=True)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    model: Mapped[str] = mapped_column(String(128), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    input_format: Mapped[str] = mapped_column(String(16))
    prediction: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[dict] = mapped_column(JSON)  # probabilities, lesions, timings, image metadata
    image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    image_media_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    org_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)  # who may read it
    created_by: Mapped[str | None] = mapped_column(String(160), nullable=True)

    def as_dict(self) -> dict:
        return {"id": self.id, "created": self.created.isoformat(), "model": self.model, "sha256": self.sha256,
                "input_format": self.input_format, "prediction": self.prediction, "threshold": self.threshold,
                **self.result, "image_stored": self.image is not None}


JOB_ACTIVE = ("queued", "running")


class Job(Base):
    """One asynchronous prediction (`chestdx.serve.jobs`): queued -> running -> done | failed.

    `owner` is the service process that accepted it and alone runs it; it renews `lease_until`
    while the job is queued or running, so a job whose process died is found (the lease passed)
    and failed by any process sharing the database."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued, running, done, failed
    model: Mapped[str] = mapped_column(String(128))
    heatmap: Mapped[bool] = mapped_column(Boolean, default=True)
    org_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)  # who may read it
    created_by: Mapped[str | None] = mapped_column(String(160), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # host:pid:random of the process
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    study_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the body /predict returns
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"status", "message", "file"}


class Database:
    """One engine per process; the schema brought to the newest migration on opening."""

    def __init__(self, url: str, migrate: bool = True):
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                        hide_parameters=True)
            event.listen(self.engine, "connect", _sqlite_wal)
        else:
            # hide_parameters: a failed statement's log line must not carry tokens or results
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, hide_parameters=True)
        if migrate:
            from chestdx.serve.migrate import upgrade

            upgrade(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def server(self) -> str:
        """Which database server, in words (for benchmark records and the health check)."""
        name = self.engine.dialect.name
        if name == "sqlite":
            return "SQLite (WAL)"
        with self.engine.connect() as conn:
            version = conn.exec_driver_sql("SHOW server_version").scalar() if name == "postgresql" else "?"
        return f"{'PostgreSQL' if name == 'postgresql' else name} {version}"

    def add(self, audit: dict | None = None, **fields) -> Study:
        """Store a study; `audit` (actor, action, detail): its audit entry, in the same transaction, so
        no study exists without the record of who created it (and one commit, not two, per request)."""
        study = Study(id=fields.pop("id", None) or _uuid(), **fields)
        with self.sessions.begin() as session:
            session.add(study)
            if audit:
                session.add(_audit_entry(org_id=study.org_id, study_id=study.id, **audit))
        return study

    def get(self, study_id: str) -> Study | None:
        with Session(self.engine) as session:
            return session.get(Study, study_id)

    def ids(self) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(Study.id)))

    # jobs ------------------------------------------------------------------------------------------
    def add_job(self, **fields) -> Job:
        job = Job(**fields)
        with self.sessions.begin() as session:
            session.add(job)
        return job

    def get_job(self, job_id: str) -> Job | None:
        with Session(self.engine) as session:
            return session.get(Job, job_id)

    def update_job(self, job_id: str, where_status: tuple, owner: str | None = None, **fields) -> bool:
        """Set `fields` on the job if its status is among `where_status` (and it belongs to `owner`, if
        given): a compare-and-set, so a job failed by its lease is never turned into done, nor run twice."""
        query = update(Job).where(Job.id == job_id, Job.status.in_(where_status))
        if owner is not None:
            query = query.where(Job.owner == owner)
        with self.sessions.begin() as session:
            return session.execute(query.values(**fields)).rowcount == 1

    def renew_leases(self, owner: str, job_ids, until: datetime) -> None:
        ids = list(job_ids)
        if not ids:
            return
        with self.sessions.begin() as session:
            session.execute(update(Job).where(Job.owner == owner, Job.id.in_(ids), Job.status.in_(JOB_ACTIVE))
                            .values(lease_until=until))

    def expire_jobs(self, now: datetime, error: dict, job_id: str | None = None) -> int:
        """Fail every queued or running job whose lease passed (or just `job_id`); returns how many."""
        query = update(Job).where(Job.status.in_(JOB_ACTIVE), or_(Job.lease_until.is_(None), Job.lease_until < now))
        if job_id is not None:
            query = query.where(Job.id == job_id)
        with self.sessions.begin() as session:
            return session.execute(query.values(status="failed", finished=now, error=error)).rowcount

    def active_job_ids(self) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(Job.id).where(Job.status.in_(JOB_ACTIVE))))

    def purge_jobs(self, finished_before: datetime) -> int:
        """Delete finished jobs (their results, heat maps included) older than `finished_before`."""
        with self.sessions.begin() as session:
            return session.execute(delete(Job).where(Job.status.notin_(JOB_ACTIVE),
                                                     Job.finished < finished_before)).rowcount

    def audit(self, actor: str, action: str, org_id: str | None = None, study_id: str | None = None,
              detail: str | None = None) -> None:
        with self.sessions.begin() as session:
            session.add(_audit_entry(actor, action, org_id, study_id, detail))

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        with Session(self.engine) as session:
            return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)))


def _audit_entry(actor: str, action: str, org_id: str | None = None, study_id: str | None = None,
                 detail: str | None = None) -> AuditEntry:
    return AuditEntry(actor=actor, action=action, org_id=org_id, study_id=study_id,
                      detail=(detail or None) and detail[:256])


def _sqlite_wal(connection, _record):
    # Write-ahead logging lets readers and one writer work at once (several worker threads);
    # foreign keys are off in SQLite unless asked for.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
