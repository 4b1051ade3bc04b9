"""A real PostgreSQL server for the tests: initdb into a fresh directory,
listening on 127.0.0.1 only, password (SCRAM) authentication over TCP."""
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install the postgresql package (cargo xtask setup does)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster, owned by the `postgres` user (initdb refuses root)."""

    user = "app"
    password = "app-secret"
    database = "crm"

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="warden-pg-"))
        owner = pwd.getpwnam("postgres")
        os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.data = self.dir / "data"
        self.port = _free_port()
        pwfile = self.dir / "pw"
        pwfile.write_text("postgres-admin\n")
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)

        def as_postgres(*cmd):
            return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, text=True)

        as_postgres(_bin("initdb"), "-D", str(self.data), "--auth-local=trust", "--auth-host=scram-sha-256",
                    "-U", "postgres", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C")
        as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "start", "-o",
                    f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}")
        self.psql_admin(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'")
        self.psql_admin(f"CREATE DATABASE {self.database} OWNER {self.user}")
        self._stop = lambda: as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def psql_admin(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-h", str(self.dir), "-p", str(self.port), "-d", database,
             "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql],
            check=True, capture_output=True, text=True,
        )
        return out.stdout

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={self.database} user={self.user} password={self.password}"

    def stop(self):
        try:
            self._stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
