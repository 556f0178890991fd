"""`chestdx users`, `chestdx keys` and `chestdx audit`: the service's accounts, kept in its database."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from chestdx.errors import ChestDxError

users_app = typer.Typer(no_args_is_help=True, help="Users of the web page: add, list, deactivate.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys for programs: create, list, revoke.")
console = Console()
DB_HELP = "SQLAlchemy URL of the service database (default: sqlite:///$CHESTDX_HOME/studies.db)"


def default_db_url() -> str:
    from chestdx.settings import home

    return f"sqlite:///{home() / 'studies.db'}"


def _accounts(db: Optional[str]):
    from chestdx.serve.auth import Accounts
    from chestdx.serve.db import Database

    try:
        return Accounts(Database(db or default_db_url()))
    except ChestDxError:
        raise
    except Exception as err:  # a wrong URL or an unreachable server: one line, not a traceback
        raise ChestDxError(f"cannot open the database {db or default_db_url()}: {err}") from None


def _password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


@users_app.command("add")
def users_add(username: str, org: str = typer.Option(..., "--org", help="the user's organisation (made if new)"),
              admin: bool = typer.Option(False, "--admin", help="reads every organisation's studies"),
              password_stdin: bool = typer.Option(False, "--password-stdin", help="read the password from stdin"),
              db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Add a user who logs in to the web page."""
    accounts = _accounts(db)
    accounts.add_user(username, _password(password_stdin), org, admin=admin)
    accounts.db.audit("cli", "user_added", detail=f"{username} ({org}{', admin' if admin else ''})")
    console.print(f"user {username} added to {org}")


@users_app.command("list")
def users_list(db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Every user, their organisation and whether they are active."""
    table = Table(title="users")
    for col in ("user", "organisation", "admin", "active", "created"):
        table.add_column(col)
    for user, org in _accounts(db).users():
        table.add_row(user.username, org, "yes" if user.is_admin else "", "yes" if user.active else "no",
                      f"{user.created:%Y-%m-%d %H:%M}")
    console.print(table)


@users_app.command("deactivate")
def users_deactivate(username: str, db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Stop a user from logging in and end their sessions (their studies stay)."""
    accounts = _accounts(db)
    accounts.deactivate_user(username)
    accounts.db.audit("cli", "user_deactivated", detail=username)
    console.print(f"user {username} deactivated")


@keys_app.command("create")
def keys_create(org: str = typer.Option(..., "--org", help="the organisation whose studies the key creates/reads"),
                scope: List[str] = typer.Option(["predict", "read"], "--scope", help="predict, read or admin"),
                name: str = typer.Option("", "--name", help="what the key is for"),
                db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Create a key; it is printed once and stored only as a hash."""
    accounts = _accounts(db)
    secret, key = accounts.create_key(org, scope, name)
    accounts.db.audit("cli", "key_created", detail=f"{key.prefix} ({org}: {key.scopes})")
    print(secret)
    Console(stderr=True).print(f"key {key.prefix} for {org} ({key.scopes}): keep it now, it is not shown again")


@keys_app.command("list")
def keys_list(db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Every key by its prefix (the secret is not stored)."""
    table = Table(title="API keys")
    for col in ("prefix", "name", "organisation", "scopes", "created", "revoked"):
        table.add_column(col)
    for key, org in _accounts(db).keys():
        table.add_row(key.prefix, key.name, org, key.scopes, f"{key.created:%Y-%m-%d %H:%M}",
                      f"{key.revoked:%Y-%m-%d %H:%M}" if key.revoked else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(prefix: str, db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Revoke a key at once, in every service process."""
    accounts = _accounts(db)
    accounts.revoke_key(prefix)
    accounts.db.audit("cli", "key_revoked", detail=prefix)
    console.print(f"key {prefix} revoked")


def audit(limit: int = typer.Option(50, "--limit"), db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Who created or read which study, logins, key and user changes: newest first."""
    table = Table(title="audit log")
    for col in ("time", "actor", "action", "study", "detail"):
        table.add_column(col)
    for e in _accounts(db).db.audit_log(limit):
        table.add_row(f"{e.time:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.study_id or "", e.detail or "")
    console.print(table)
