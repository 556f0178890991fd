"""Who is asking: API keys for programs, users with a login session for the web page.

- API keys: `cdx_` + 32 random bytes (URL-safe). Only the SHA-256 is stored: a key is a random
  secret, not a password, so a fast hash is safe and lets every request be checked cheaply. A key
  has scopes: `predict` (post images), `read` (read studies), `admin` (everything, any organisation).
- Users: passwords hashed with argon2id (argon2-cffi). A login creates a session whose random
  token goes to an HttpOnly, SameSite=Strict cookie (Secure behind TLS) and whose CSRF token the
  page sends back in the `X-CSRF-Token` header on every state-changing request.
- A study belongs to the organisation of whoever created it; only that organisation and admins
  read it (others get 404, so a study id does not reveal that the study exists).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select

from chestdx.errors import ChestDxError
from chestdx.serve.db import ApiKey, Database, LoginSession, Organisation, User

SCOPES = ("predict", "read", "admin")
KEY_PREFIX = "cdx_"
SESSION_COOKIE = "chestdx_session"
SESSION_HOURS = 12
_hasher = PasswordHasher()  # argon2id with the library's recommended parameters (64 MiB each)
_verifying = threading.BoundedSemaphore(4)  # logins at once: bounds their memory and keeps threads for the rest
# Verified against when the user does not exist, so a login takes as long either way.
_DUMMY_HASH = _hasher.hash("not a password")


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    actor: str  # "user:alice", "key:cdx_Ab12Cd34", "local" (auth off)
    org_id: str | None
    scopes: frozenset
    csrf_token: str | None = None  # set for cookie sessions: unsafe methods must echo it

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes


LOCAL = Principal("local", None, frozenset(SCOPES))  # --no-auth on loopback: one local administrator


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite returns naive datetimes


class Accounts:
    """Users, keys and sessions in the service database."""

    def __init__(self, db: Database):
        self.db = db

    # organisations and users -------------------------------------------------------------------
    def organisation(self, session, name: str, create: bool = True) -> Organisation:
        org = session.scalar(select(Organisation).where(Organisation.name == name))
        if org is None:
            if not create:
                raise ChestDxError(f"no organisation {name!r}")
            org = Organisation(name=name)
            session.add(org)
            session.flush()
        return org

    def add_user(self, username: str, password: str, org: str, admin: bool = False) -> User:
        if not username.strip() or len(username) > 128:
            raise ChestDxError("a user name is 1 to 128 characters")
        if len(password) < 10:
            raise ChestDxError("a password has at least 10 characters")
        with self.db.sessions.begin() as session:
            if session.scalar(select(User).where(User.username == username)) is not None:
                raise ChestDxError(f"user {username!r} exists")
            user = User(username=username, password_hash=_hasher.hash(password),
                        org_id=self.organisation(session, org).id, is_admin=admin, active=True)
            session.add(user)
        return user

    def users(self) -> list[tuple[User, str]]:
        with self.db.sessions() as session:
            rows = session.execute(select(User, Organisation.name).join(Organisation)).all()
            return [(u, name) for u, name in rows]

    def deactivate_user(self, username: str) -> None:
        with self.db.sessions.begin() as session:
            user = session.scalar(select(User).where(User.username == username))
            if user is None:
                raise ChestDxError(f"no user {username!r}")
            user.active = False
            for s in session.scalars(select(LoginSession).where(LoginSession.user_id == user.id)):
                session.delete(s)

    # API keys ----------------------------------------------------------------------------------
    def create_key(self, org: str, scopes, name: str = "") -> tuple[str, ApiKey]:
        """A new key: the secret, shown once, and its record."""
        scopes = sorted(set(scopes))
        unknown = set(scopes) - set(SCOPES)
        if not scopes or unknown:
            raise ChestDxError(f"scopes must be among {', '.join(SCOPES)} (got {', '.join(scopes) or 'none'})")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.db.sessions.begin() as session:
            key = ApiKey(prefix=secret[:12], key_hash=sha256(secret), name=name or "key",
                         org_id=self.organisation(session, org).id, scopes=",".join(scopes))
            session.add(key)
        return secret, key

    def keys(self) -> list[tuple[ApiKey, str]]:
        with self.db.sessions() as session:
            return [(k, n) for k, n in session.execute(select(ApiKey, Organisation.name).join(Organisation)).all()]

    def revoke_key(self, prefix: str) -> None:
        with self.db.sessions.begin() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
            if key is None:
                raise ChestDxError(f"no key with prefix {prefix!r}")
            key.revoked = _now()

    def by_key(self, secret: str) -> Principal | None:
        if not secret.startswith(KEY_PREFIX) or len(secret) > 100:
            return None
        with self.db.sessions() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.key_hash == sha256(secret)))
        if key is None or key.revoked is not None:
            return None
        return Principal(f"key:{key.prefix}", key.org_id, frozenset(key.scopes.split(",")))

    # login sessions ----------------------------------------------------------------------------
    def login(self, username: str, password: str) -> tuple[str, str, User] | None:
        """(session token, CSRF token, user) for the right password of an active user, else None."""
        with self.db.sessions() as session:
            user = session.scalar(select(User).where(User.username == username))
        try:
            with _verifying:
                ok = _hasher.verify(user.password_hash if user else _DUMMY_HASH, password) and user is not None
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or not user.active:
            return None
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.db.sessions.begin() as session:
            session.add(LoginSession(token_hash=sha256(token), user_id=user.id, csrf_token=csrf,
                                     expires=_now() + timedelta(hours=SESSION_HOURS)))
        return token, csrf, user

    def by_session(self, token: str) -> tuple[Principal, User] | None:
        if not token or len(token) > 100:
            return None
        with self.db.sessions() as session:
            row = session.execute(select(LoginSession, User).join(User, User.id == LoginSession.user_id)
                                  .where(LoginSession.token_hash == sha256(token))).first()
        if row is None:
            return None
        login, user = row
        if _aware(login.expires) < _now() or not user.active:
            return None
        scopes = frozenset(SCOPES) if user.is_admin else frozenset(("predict", "read"))
        return Principal(f"user:{user.username}", user.org_id, scopes, login.csrf_token), user

    def logout(self, token: str) -> None:
        with self.db.sessions.begin() as session:
            login = session.get(LoginSession, sha256(token))
            if login is not None:
                session.delete(login)


def same_token(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
