"""A real OpenSSH server for the tests: Debian's /usr/sbin/sshd (package
openssh-server, installed by `cargo xtask setup`) on 127.0.0.1 and a free
port, with everything of its own in a fresh directory: host keys (ed25519
and RSA, made with ssh-keygen), sshd_config, pid file, authorized keys and a
client key. The system's sshd, /etc/ssh/sshd_config and /etc/ssh host keys
are never used.

    with Sshd() as sshd:
        sshd.write_known_hosts(tmp / "known_hosts")
        argv = ssh_cmd(sshd.port, "echo", "hi", key=sshd.client_key,
                       known_hosts=tmp / "known_hosts")
        # or paramiko: client.load_host_keys(...); client.connect(
        #     "127.0.0.1", sshd.port, username=sshd.user,
        #     key_filename=str(sshd.client_key), look_for_keys=False, allow_agent=False)

Logins: `user` (root, key auth with `client_key` or any key given to
`add_authorized_key`) and, for password authentication, `password_user`
with `password`: a local account "warden-ssh-test" that the constructor
creates if missing (useradd) and whose password it sets (chpasswd) each
time. sshd runs with UsePAM no, so passwords are checked against
/etc/shadow by sshd itself. One AuthorizedKeysFile serves both users.

sshd needs root here (privilege separation, logging in as other users):
the tests run as root. It wants its privilege-separation directory
/run/sshd, which the constructor creates when missing (a fresh container
has none until the system sshd has been started once).

`log()` is sshd's own log (-e: to stderr, LogLevel VERBOSE) so far; it
begins with "Server listening on 127.0.0.1 port N." and the readiness
probe's connection (three lines: "Connection from 127.0.0.1 port ...",
"kex_exchange_identification: Connection closed by remote host",
"Connection closed by 127.0.0.1 port ..."), then one "Accepted publickey
for root from 127.0.0.1 port ..." or "Accepted password for
warden-ssh-test from ..." per login.
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself, so it must be an absolute path.
PRIVSEP_DIR = Path("/run/sshd")
PASSWORD_USER = "warden-ssh-test"
PASSWORD = "warden-ssh-test-password"
HOST_KEY_TYPES = ("ed25519", "rsa")

# sshd takes the first value it reads for a keyword, so `extra_config`
# goes above these lines and overrides them.
CONFIG = """\
{extra}
ListenAddress 127.0.0.1
Port {port}
AddressFamily inet
{host_keys}
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
AuthorizedPrincipalsFile none
AuthorizedKeysCommand none
AllowUsers root {password_user}
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication yes
PermitEmptyPasswords no
KbdInteractiveAuthentication no
HostbasedAuthentication no
GSSAPIAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
AllowAgentForwarding yes
X11Forwarding no
PermitTTY yes
PrintMotd no
PrintLastLog no
UseDNS no
LoginGraceTime 30
MaxStartups 100:30:200
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd, input=None):
    r = subprocess.run(cmd, input=input, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def keygen(path, type: str = "ed25519", comment: str = "warden-test") -> Path:
    """A new key pair without a passphrase, made with ssh-keygen (OpenSSH
    private key format, which paramiko reads): `path` and `path`.pub."""
    path = Path(path)
    args = ["-b", "3072"] if type == "rsa" else []
    _run("ssh-keygen", "-q", "-t", type, *args, "-N", "", "-C", comment, "-f", str(path))
    return path


def public_line(pub_path) -> str:
    """"type base64" of a .pub file, without its comment."""
    return " ".join(Path(pub_path).read_text().split()[:2])


def _ensure_password_user():
    """The account `PASSWORD_USER` with the password `PASSWORD`: created if
    missing, its password set again each time (idempotent; retried, since
    another test process may hold the lock on /etc/passwd or /etc/shadow)."""
    last = None
    for _ in range(20):
        try:
            try:
                pwd.getpwnam(PASSWORD_USER)
            except KeyError:
                _run("useradd", "--create-home", "--shell", "/bin/sh", "--comment", "Warden SSH tests", PASSWORD_USER)
            _run("chpasswd", input=f"{PASSWORD_USER}:{PASSWORD}\n")
            return
        except RuntimeError as e:
            last = e
            time.sleep(0.2)
    raise last


def ssh_cmd(port: int, *args, key=None, known_hosts, user: str = "root", host: str = "127.0.0.1",
            extra_opts=None) -> list[str]:
    """An OpenSSH client argv for `user`@`host`:`port` running `args` (the
    remote command; none for a shell). Non-interactive (BatchMode=yes, so
    never a password prompt) and strict about the host key: only
    `known_hosts` is read (GlobalKnownHostsFile=/dev/null), an unknown or
    changed key fails ("Host key verification failed.", exit status 255).
    Only `key` is offered (IdentitiesOnly=yes; no agent). No ssh_config is
    read (-F /dev/null). `extra_opts` (a dict, or "Key=Value" strings) come
    first and so override these defaults, as for ssh the first value wins."""
    if isinstance(extra_opts, dict):
        extra_opts = [f"{k}={v}" for k, v in extra_opts.items()]
    opts = list(extra_opts or []) + [
        "BatchMode=yes",
        f"UserKnownHostsFile={known_hosts}",
        "GlobalKnownHostsFile=/dev/null",
        "StrictHostKeyChecking=yes",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "ControlMaster=no",
        "ControlPath=none",
        "ConnectTimeout=10",
    ]
    argv = ["ssh", "-F", "/dev/null"]
    for o in opts:
        argv += ["-o", o]
    if key is not None:
        argv += ["-i", str(key)]
    return [*argv, "-p", str(port), "-l", user, host, *map(str, args)]


def _procs() -> dict[int, list[str]]:
    """/proc/PID/stat of every process, as the fields after the command name
    (state, ppid, ..., starttime at index 19)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            out[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
    return out


def _alive(procs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Those of `procs` still running: same pid and start time, not a zombie."""
    now = _procs()
    return [(pid, start) for pid, start in procs
            if pid in now and now[pid][19] == start and now[pid][0] != "Z"]


def _signal(procs: list[tuple[int, str]], sig: int):
    for pid, _ in _alive(procs):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Sshd:
    """One sshd -D on 127.0.0.1. Started by the constructor; stopped by
    `stop()` or at the end of a `with` block.

    `extra_config`: sshd_config lines (a string) that override the defaults
    above, e.g. "AllowTcpForwarding no". `password_user`: whether to create
    and set up the password account (see the module's docstring)."""

    user = "root"
    password_user = PASSWORD_USER
    password = PASSWORD

    def __init__(self, extra_config: str = "", password_user: bool = True, timeout: float = 20):
        if os.geteuid() != 0:
            raise RuntimeError("the sshd peer needs root (privilege separation, logins as other users)")
        if not Path(SSHD).exists():
            raise RuntimeError(f"{SSHD} not found: install openssh-server (cargo xtask setup does)")
        if shutil.which("ssh-keygen") is None:
            raise RuntimeError("ssh-keygen not found: install openssh-client (cargo xtask setup does)")
        if password_user:
            _ensure_password_user()
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="warden-sshd."))
        # Readable by the password user: sshd reads the authorized keys as the user logging in.
        self.dir.chmod(0o755)
        self.proc = None
        try:
            self.host_keys = {t: keygen(self.dir / f"ssh_host_{t}_key", t, "warden-sshd-host") for t in HOST_KEY_TYPES}
            self.client_key = keygen(self.dir / "client_ed25519", "ed25519", "warden-sshd-client")
            self.authorized_keys = self.dir / "authorized_keys"
            self.authorized_keys.write_text(public_line(f"{self.client_key}.pub") + "\n")
            self.authorized_keys.chmod(0o644)
            self.config = self.dir / "sshd_config"
            self.config.write_text(CONFIG.format(
                extra=extra_config, port=self.port, dir=self.dir, password_user=PASSWORD_USER,
                host_keys="\n".join(f"HostKey {p}" for p in self.host_keys.values()),
            ))
            _run(SSHD, "-t", "-f", str(self.config))
            self.known_hosts = self.write_known_hosts(self.dir / "known_hosts")
            self.log_path = self.dir / "sshd.log"
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not accept on 127.0.0.1:{self.port} within {timeout} s:\n{self.log()}")

    def host_key_lines(self) -> list[str]:
        """Its public host keys, "ssh-ed25519 AAAA..." then "ssh-rsa AAAA..."."""
        return [public_line(f"{p}.pub") for p in self.host_keys.values()]

    def known_hosts_line(self, type: str | None = None) -> str:
        """known_hosts lines for its host keys (all, or the one of `type`:
        "ed25519" or "rsa"), as OpenSSH writes them for a port other than 22:
        "[127.0.0.1]:PORT ssh-ed25519 AAAA...", one per line, ending in "\\n"."""
        keys = self.host_key_lines() if type is None else [public_line(f"{self.host_keys[type]}.pub")]
        return "".join(f"[127.0.0.1]:{self.port} {k}\n" for k in keys)

    def write_known_hosts(self, path, type: str | None = None) -> Path:
        """Write `known_hosts_line(type)` to `path` (replacing it); returns the path."""
        path = Path(path)
        path.write_text(self.known_hosts_line(type))
        return path

    def add_authorized_key(self, publine: str):
        """Let `publine` ("ssh-ed25519 AAAA..." or a whole .pub) log in as either user."""
        with open(self.authorized_keys, "a") as f:
            f.write(publine.strip() + "\n")

    def ssh_cmd(self, *args, **kw) -> list[str]:
        """`ssh_cmd` for this server with its client key and known hosts by default."""
        kw.setdefault("key", self.client_key)
        kw.setdefault("known_hosts", self.known_hosts)
        return ssh_cmd(self.port, *args, **kw)

    def log(self) -> str:
        """sshd's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except (AttributeError, OSError):
            return ""

    def wait_log(self, text: str, timeout: float = 5) -> str:
        """The log once it contains `text` (sshd writes some lines, such as
        disconnections, after the client has returned)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"sshd's log has no {text!r} after {timeout} s:\n{log}")
            time.sleep(0.05)

    def _descendants(self) -> list[tuple[int, str]]:
        """Processes under the listener (per-connection sshd, their shells), as
        (pid, start time): they call setsid(), so neither a process group nor
        the listener's exit reaches them."""
        children: dict[int, list[tuple[int, str]]] = {}
        for pid, fields in _procs().items():
            children.setdefault(int(fields[1]), []).append((pid, fields[19]))
        found, todo = [], [self.proc.pid]
        while todo:
            for c in children.get(todo.pop(), []):
                found.append(c)
                todo.append(c[0])
        return found

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            procs = self._descendants()
            self.proc.terminate()
            _signal(procs, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            deadline = time.monotonic() + 5
            while _alive(procs) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal(_alive(procs), signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Sshd":
        return self

    def __exit__(self, *exc):
        self.stop()
