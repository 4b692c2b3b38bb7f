"""Where a study lives: the Optuna RDB storage, its URL without password, and plan claims.

Optuna stores trials but has no atomic "this plan is mine" operation, and two
workers whose samplers propose the same plan at once would both build and
measure it.  :class:`PlanClaims` adds that, as one small table in the same
database: a row per distinct plan, unique per study, with a unique budget slot,
so neither a plan nor the trial budget can be taken twice, on SQLite or
PostgreSQL alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from precsearch.errors import ConfigError, first_line

logger = logging.getLogger(__name__)

STUDY_FILE = "study.db"
CLAIMS_TABLE = "precsearch_plan_claims"


class StorageError(ConfigError):
    """The storage URL is malformed or its database cannot be reached."""


def default_storage_url(workdir: str | Path) -> str:
    """SQLite in the work directory: ``sqlite:///<workdir>/study.db``."""
    return f"sqlite:///{(Path(workdir) / STUDY_FILE).resolve()}"


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs, progress, reports and stored settings)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable storage URL>"


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password removed wherever a driver quoted it."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:  # an unparseable URL has no password to find
        return text
    return text.replace(str(password), "***") if password else text


@contextlib.contextmanager
def quiet_experimental():
    """Optuna flags heartbeats, the brute-force sampler and metric names as experimental on every use."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(url: str, *, heartbeat_interval_s: int | None = None, grace_period_s: int | None = None,
                 max_retry: int = 2):
    """An Optuna ``RDBStorage`` with heartbeats, reached once before it is returned.

    A trial whose worker stops beating for ``grace_period_s`` (killed, machine
    lost) is failed by the next worker that starts a trial and re-queued with
    the same plan (Optuna's ``RetryHeartbeatStaleTrialCallback``).

    Raises
    ------
    StorageError
        One line naming the redacted URL and the cause; never the password.
    """
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(f"The 'storage' parameter of search must be a database URL such as "
                           f"sqlite:///study.db or postgresql://user@host/db; got {redact_url(url)!r} instead.") \
            from None
    engine_kwargs = {}
    driver_url = url
    if parsed.drivername == "postgresql":
        # The driver precsearch installs (psycopg 3); SQLAlchemy 2.0 would look for psycopg2.
        driver_url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            folder = Path(parsed.database).parent
            if not folder.is_dir():
                raise StorageError(f"The SQLite storage folder {str(folder)!r} does not exist.")
        # Workers of one machine share the file: wait for its lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
        if parsed.get_backend_name() == "postgresql":
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            with quiet_experimental():
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry) \
                    if heartbeat_interval_s else None
                return optuna.storages.RDBStorage(driver_url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval_s,
                                                  grace_period=grace_period_s, heartbeat_stale_trial_callback=retry)
        except Exception as exc:  # SQLAlchemy, the DB driver and Optuna each raise their own types
            # Two processes opening a new database at once both create Optuna's schema; the loser's
            # CREATE TABLE or schema-version INSERT fails although the schema is then complete (measured:
            # 2 of 6 simultaneous starts on SQLite), so a second look succeeds.
            if attempt + 1 < _SCHEMA_ATTEMPTS and _lost_schema_race(exc):
                time.sleep(0.5)
                continue
            raise StorageError(f"cannot open the storage {redact_url(url)}: {scrub(first_line(exc), url)}") from None


_SCHEMA_ATTEMPTS = 3


def _lost_schema_race(exc: BaseException) -> bool:
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    text = str(exc)
    return isinstance(exc, IntegrityError) or (
        isinstance(exc, (OperationalError, ProgrammingError)) and "already exists" in text)


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a plan for a trial."""

    outcome: str  # "owned": this trial evaluates it; "taken": ``owner`` has it; "full": no budget slot left
    owner: int | None = None
    slot: int | None = None


class PlanClaims:
    """Atomic per-study plan claims and budget slots in the study's database.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The storage's engine (``RDBStorage.engine``).
    study_name : str
    """

    def __init__(self, engine, study_name: str):
        import sqlalchemy as sa

        self.engine = engine
        self.study_name = study_name
        metadata = sa.MetaData()
        self.table = sa.Table(
            CLAIMS_TABLE, metadata,
            sa.Column("study_name", sa.String(512), primary_key=True),
            sa.Column("plan_hash", sa.String(40), primary_key=True),
            sa.Column("plan_key", sa.Text, nullable=False),
            sa.Column("slot", sa.Integer, nullable=False),
            sa.Column("owner_trial", sa.Integer, nullable=False),
            sa.Column("claimed_at", sa.Float, nullable=False),
            sa.UniqueConstraint("study_name", "slot", name=f"{CLAIMS_TABLE}_slot"),
        )
        metadata.create_all(engine, checkfirst=True)

    @staticmethod
    def _hash(plan_key: str) -> str:
        return hashlib.sha1(plan_key.encode()).hexdigest()

    def claim(self, plan_key: str, trial_number: int, budget: int | None) -> Claim:
        """Claim ``plan_key`` for ``trial_number``, taking a budget slot if it is new.

        A plan already claimed returns ``taken`` with its owner; a new plan when
        ``budget`` slots are taken returns ``full``.  Concurrent claims are
        settled by the table's unique keys: the loser re-reads and retries.
        """
        import sqlalchemy as sa
        from sqlalchemy.exc import IntegrityError

        plan_hash = self._hash(plan_key)
        t = self.table
        for _ in range(100):
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(t.c.owner_trial, t.c.slot).where(
                    t.c.study_name == self.study_name, t.c.plan_hash == plan_hash)).first()
                if row is not None:
                    return Claim("taken", owner=row.owner_trial, slot=row.slot)
                used = conn.execute(sa.select(sa.func.count()).select_from(t).where(
                    t.c.study_name == self.study_name)).scalar_one()
                if budget is not None and used >= budget:
                    return Claim("full")
                try:
                    conn.execute(t.insert().values(study_name=self.study_name, plan_hash=plan_hash, plan_key=plan_key,
                                                   slot=used, owner_trial=trial_number, claimed_at=time.time()))
                    conn.commit()
                    return Claim("owned", owner=trial_number, slot=used)
                except IntegrityError:  # another worker took this plan or this slot first
                    conn.rollback()
            time.sleep(0.05)
        raise StorageError(f"could not claim plan {plan_key!r}: the claims table stayed contended")

    def take_over(self, plan_key: str, old_owner: int, new_owner: int) -> bool:
        """Move a claim from a trial that died or was interrupted to ``new_owner``; False if someone else did."""
        t = self.table
        with self.engine.connect() as conn:
            result = conn.execute(t.update().where(
                t.c.study_name == self.study_name, t.c.plan_hash == self._hash(plan_key),
                t.c.owner_trial == old_owner).values(owner_trial=new_owner, claimed_at=time.time()))
            conn.commit()
            return result.rowcount == 1

    def owners(self) -> dict[str, int]:
        """Every claimed plan key and its owning trial number."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.plan_key, t.c.owner_trial).where(t.c.study_name == self.study_name))
            return {row.plan_key: row.owner_trial for row in rows}

    def count(self) -> int:
        import sqlalchemy as sa

        t = self.table
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(t).where(
                t.c.study_name == self.study_name)).scalar_one()
