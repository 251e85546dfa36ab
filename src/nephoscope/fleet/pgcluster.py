"""A throwaway PostgreSQL cluster (Debian's postgresql-15) in a directory: for tests, the bench and a local demo.

There is no init system: initdb and pg_ctl run directly, as an unprivileged user when we are root
(PostgreSQL refuses to run as root), listening on loopback TCP only, with trust auth for loopback.
`python -m nephoscope.fleet.pgcluster start|stop|restart DIR [PORT]` (scripts/pg.sh) drives it by hand.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nephoscope.core.errors import NephoscopeError

PG_BIN = Path("/usr/lib/postgresql/15/bin")
RUN_AS = "nobody"


class PgError(NephoscopeError):
    """The PostgreSQL cluster could not be created, started or stopped."""


def free_port() -> int:
    """Return a TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class PgCluster:
    """One cluster: its data directory and port; `url` is what the fleet server is given."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        """Return the data directory."""
        return self.root / "data"

    @property
    def url(self) -> str:
        """Return the SQLAlchemy URL of the `nephoscope` database."""
        return f"postgresql+psycopg://nephoscope@127.0.0.1:{self.port}/nephoscope"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(PG_BIN / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
        if check and done.returncode != 0:
            raise PgError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return done

    def init(self) -> None:
        """Create the cluster (superuser `nephoscope`, loopback trust auth) and its `nephoscope` database."""
        if not (PG_BIN / "initdb").exists():
            raise PgError(f"no PostgreSQL at {PG_BIN}; run scripts/setup.sh (installs postgresql-15)")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            os.chmod(self.root, 0o755)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "nephoscope", "--auth=trust", "-E", "UTF8", "--no-sync")
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = ''\n"
                    "fsync = on\nmax_connections = 200\n")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "nephoscope", "nephoscope")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: roll back open transactions; `immediate`: as a crash would)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        """Stop and start the server (connections drop; clients must reconnect and retry)."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop the server and delete the directory."""
        self.stop("immediate")
        time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Drive a cluster by hand: start (init if new), stop, restart DIR [PORT]; print its URL."""
    if len(argv) < 2 or argv[0] not in ("start", "stop", "restart", "destroy"):
        print("usage: python -m nephoscope.fleet.pgcluster start|stop|restart|destroy DIR [PORT]", file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    port_file = root / "port"
    port = int(argv[2]) if len(argv) > 2 else int(port_file.read_text()) if port_file.exists() else free_port()
    cluster = PgCluster(root, port)
    try:
        if argv[0] == "start":
            if cluster.data.exists():
                cluster.start()
            else:
                cluster.init()
                port_file.write_text(str(port))
            print(cluster.url)
        else:
            getattr(cluster, argv[0])()
    except PgError as exc:
        print(f"pgcluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
