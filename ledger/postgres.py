"""The PostgreSQL backend: ``PostgresStore`` keeps every actor's ledger in one database.

Needs the ``postgres`` extra (``pip install 'durable-triggers[postgres]'``: asyncpg and
greenlet). Most users never touch this module: ``ActorHost(spec, database_url=...)`` uses it.
"""

from ._pg import SCHEMA as SCHEMA
from ._pg import SCHEMA_VERSION as SCHEMA_VERSION
from ._pg import PostgresStore as PostgresStore

__all__ = ["SCHEMA", "SCHEMA_VERSION", "PostgresStore"]
