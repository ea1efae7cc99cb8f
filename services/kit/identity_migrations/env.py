"""Alembic environment of the identity tables (API keys, audit events), which every service reads."""

from services.kit.db import run_migration_env
from services.kit.identity import Base

run_migration_env(Base.metadata)
