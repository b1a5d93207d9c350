"""``hydra.sweeper.storage`` of ``hparams_search=optuna``: an optuna 2.x RDB storage that works on SQLAlchemy 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def optuna_storage(url: str | None = None) -> Any:
    """``hydra.sweeper.storage`` of ``hparams_search=optuna``: in memory when ``url`` is empty, else an RDB
    storage (``sqlite:///study.db``) that keeps the study for a later ``-m`` to continue or for several workers.

    optuna 2.x (the Hydra sweeper requires optuna < 3) stamps its alembic schema version on a bare
    ``engine.connect()`` and never commits: SQLAlchemy 2 dropped autocommit, so the stamp is rolled back while
    its open transaction keeps SQLite's write lock. ``RDBStorage(url)`` then fails with ``AssertionError`` in
    ``get_current_version`` (``database is locked`` with ``skip_compatibility_check``). The two version-manager
    methods run here in committed transactions; the rest of optuna 2.10's RDB storage works on SQLAlchemy 2.
    """
    if not url:
        return None
    import optuna
    import sqlalchemy

    if optuna.__version__.startswith("2.") and int(sqlalchemy.__version__.split(".")[0]) >= 2:
        _patch_optuna2_version_manager()
    url = str(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)  # SQLite creates no folders
    return optuna.storages.RDBStorage(url)


def _patch_optuna2_version_manager() -> None:
    import alembic.migration
    from optuna.storages._rdb import storage as rdb

    vm = rdb._VersionManager
    if getattr(vm, "_setr_sqlalchemy2", False):
        return

    def _init_alembic(self) -> None:
        with self.engine.begin() as conn:  # commits the stamp
            context = alembic.migration.MigrationContext.configure(conn)
            if context.get_current_revision() is not None:
                return
            revision = self.get_head_version() if self._is_alembic_supported() else self._get_base_version()
            context.stamp(self._create_alembic_script(), revision)

    def get_current_version(self) -> str:
        with self.engine.connect() as conn:  # closed: no transaction left holding the lock
            version = alembic.migration.MigrationContext.configure(conn).get_current_revision()
        assert version is not None
        return version

    vm._init_alembic = _init_alembic
    vm.get_current_version = get_current_version
    vm._setr_sqlalchemy2 = True
