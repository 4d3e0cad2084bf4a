"""Walk the README's production install ("Operating", then "Sending domains") on this machine.

Run as root, from the clone: `.venv/bin/python scripts/walk_install.py` (`--help` lists the
options; any Python 3.11 with `cryptography` will do). It takes the shell lines from README.md
itself, so the walk follows what the README says today, and runs them one by one in a tree of
its own (PREFIX/opt, PREFIX/etc, PREFIX/var, PREFIX/usr/local/bin; default /tmp/mailrelay-walk)
with a system user of its own (default mailrelay-walk; not `mailrelay`, which the tests and a real
install may mean). Each path and the user name are rewritten into that tree; nothing else is.

systemd need not run here (in a container it usually is not PID 1), so `systemctl enable --now
mailrelay` is emulated from the unit file as systemd 252 does it: `systemd-analyze verify` on the
unit; StateDirectory= made with its mode and owner, ConfigurationDirectory= checked against its
mode (systemd warns and leaves an existing one as it is); then ExecStartPre= and ExecStart= in a
private mount namespace with ProtectSystem=strict (every mount read-only but the state directory
and ReadWritePaths=), PrivateTmp=, ProtectHome=, as User=/Group= with the unit's UMask=,
AmbientCapabilities= and CapabilityBoundingSet=, NoNewPrivileges=, MemoryDenyWriteExecute= (the
kernel's PR_SET_MDWE) and SystemCallFilter=/RestrictAddressFamilies= (seccomp, where the
python3-seccomp package is installed; else said and skipped); Type=notify through a NOTIFY_SOCKET
of its own. Not emulated: PrivateDevices=, the Protect{Kernel*,Clock,Hostname,Proc}= settings,
RestrictNamespaces= and the other Restrict*=.

The operator's edits are the walk's too: `hostname` stays relay.example.net, the listeners move
to 127.0.0.1 (the same ports, 587 and 465, unless --submission-port/--implicit-tls-port), and
nothing may leave: `[delivery] hold = true` and `allow_unverified_domains = true`, since no DNS
record can be published for example.org. `domain check` (it asks public DNS) is not run; `user
add` gets its password with --password-stdin (no terminal here). Then a message is sent with
smtplib (STARTTLS, AUTH) and must be queued and DKIM-signed, the service must own every file in
its state directory, reload on SIGHUP and stop on SIGTERM. At the end the user and the tree are
removed (--keep keeps them). Exit 0 when every step worked.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import grp
import ipaddress
import os
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
HOSTNAME = "relay.example.net"
PASSWORD = "correct horse battery staple"
CERTBOT_LIVE = f"/etc/letsencrypt/live/{HOSTNAME}"
# What the README's lines name, and where the walk puts each under its prefix.
PATHS = (
    CERTBOT_LIVE,
    "/etc/systemd/system",
    "/etc/mailrelay",
    "/opt/mailrelay",
    "/usr/local/bin/mailrelay",
    "/var/lib/mailrelay",
)
# Where the sandbox keeps the walk's tree while it puts a fresh /tmp over it (PrivateTmp=).
HOLD = Path("/run/mailrelay-walk-hold")
TMP_DIRS = ("/tmp", "/var/tmp")  # noqa: S108 (what PrivateTmp= replaces)
SANDBOX_EXEC = '''\
"""Run as the service user by setpriv: what systemd applies last before exec."""
import ctypes, os, sys

umask, mdwe, families, allow = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
os.umask(int(umask, 8))
if mdwe == "yes":  # MemoryDenyWriteExecute=yes: PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        sys.exit(f"sandbox: PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
if allow:
    import seccomp

    f = seccomp.SyscallFilter(defaction=seccomp.KILL_PROCESS)
    for name in allow.split(","):
        if families and name == "socket":
            continue  # below, by family
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            pass  # not a system call of this architecture
    if families:
        # RestrictAddressFamilies=: socket() with another family fails with EAFNOSUPPORT (97).
        allowed = sorted(int(x) for x in families.split(","))
        for family in range(allowed[-1] + 1):
            action = seccomp.ALLOW if family in allowed else seccomp.ERRNO(97)
            f.add_rule(action, "socket", seccomp.Arg(0, seccomp.EQ, family))
        f.add_rule(seccomp.ERRNO(97), "socket", seccomp.Arg(0, seccomp.GT, allowed[-1]))
    else:
        f.add_rule(seccomp.ALLOW, "socket")
    f.load()
try:
    os.execvp(sys.argv[5], sys.argv[5:])
except OSError as exc:
    sys.exit(f"sandbox: cannot execute {sys.argv[5]}: {exc.strerror}")
'''

# Run in the sandbox as the service user before the unit's commands: is each setting in force?
PROBE = """\
import mmap, os, socket, sys

state, read_only, marker = sys.argv[1:4]
problems = []
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
mask = os.umask(0)
os.umask(mask)
if mask != 0o077:
    problems.append(f"UMask: {mask:04o}")
if int(status["CapEff"], 16) != 1 << 10 or int(status["CapAmb"], 16) != 1 << 10:
    problems.append(f"capabilities: {status['CapEff'].strip()} {status['CapAmb'].strip()}")
if status["NoNewPrivs"].strip() != "1":
    problems.append("NoNewPrivileges: off")
if status["Seccomp"].strip() != "2":
    problems.append("SystemCallFilter: no seccomp filter")
try:
    open(os.path.join(read_only, "probe"), "w").close()
    problems.append(f"ProtectSystem=strict: wrote in {read_only}")
except OSError as exc:
    if exc.errno != 30:
        problems.append(f"ProtectSystem=strict: {read_only}: {exc} (not EROFS)")
probe = os.path.join(state, "probe")
open(probe, "w").close()
os.unlink(probe)
if os.path.exists(marker):
    problems.append(f"PrivateTmp: {marker} is visible")
try:
    if os.listdir("/root"):
        problems.append("ProtectHome: /root is visible")
except PermissionError:
    pass
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    problems.append("MemoryDenyWriteExecute: a writable and executable mapping was made")
except OSError:
    pass
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
    problems.append("RestrictAddressFamilies: an AF_NETLINK socket was made")
except OSError as exc:
    if exc.errno != 97:
        problems.append(f"RestrictAddressFamilies: AF_NETLINK: {exc} (not EAFNOSUPPORT)")
print("; ".join(problems) or "in force", flush=True)
sys.exit(1 if problems else 0)
"""


class WalkFailed(Exception):
    pass


@dataclass
class Walk:
    prefix: Path
    user: str
    submission_port: int
    implicit_tls_port: int
    metrics_port: int
    steps: list[tuple[str, str]] = field(default_factory=list)
    service: subprocess.Popen[bytes] | None = None
    config_edited: bool = False
    notify: socket.socket | None = None
    seccomp: tuple[str, str] | None = None

    # ---- paths and commands ----------------------------------------------------------------

    def at(self, path: str) -> Path:
        return self.prefix / path.lstrip("/")

    def rewrite(self, line: str) -> str:
        """A README line with its paths moved under the prefix and its user renamed: the user is
        named by `-u`, `-o`, `-g`, `--owner`, `--group`, `user:group`, and last on `useradd`."""
        line = re.sub(
            "|".join(re.escape(p) for p in PATHS), lambda m: str(self.at(m.group(0))), line
        )
        line = re.sub(r"(?<=-[ugo] )mailrelay\b|(?<=--owner[= ])mailrelay\b", self.user, line)
        line = re.sub(r"(?<=--group[= ])mailrelay\b", self.user, line)
        line = re.sub(r"\bmailrelay:mailrelay\b", f"{self.user}:{self.user}", line)
        return re.sub(r"^(useradd .*) mailrelay$", rf"\1 {self.user}", line)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.at('/usr/local/bin')}:{env.get('PATH', '/usr/bin:/bin')}"
        env["MAILRELAY_CONFIG"] = str(self.at("/etc/mailrelay/mailrelay.toml"))
        env["MAILRELAY_SERVICE_USER"] = self.user
        env.pop("VIRTUAL_ENV", None)
        return env

    def step(self, what: str, outcome: str = "ok") -> None:
        self.steps.append((what, outcome))
        print(f"walk: {what}: {outcome}", flush=True)

    def shell(self, line: str, *, stdin: str | None = None, cwd: Path | None = None) -> str:
        print(f"walk: $ {line}", flush=True)
        done = subprocess.run(
            ["/bin/bash", "-e", "-o", "pipefail", "-c", line],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=cwd or self.prefix / "src",
            env=self.env(),
            timeout=900,
            check=False,
        )
        output = (done.stdout + done.stderr).strip()
        if output:
            print("\n".join(f"      {x}" for x in output.splitlines()[-12:]), flush=True)
        if done.returncode != 0:
            self.step(line, f"FAILED (exit {done.returncode})")
            raise WalkFailed(line)
        self.step(line)
        return done.stdout

    # ---- the walk ----------------------------------------------------------------------------

    def prepare(self) -> None:
        if os.geteuid() != 0:
            raise WalkFailed("run as root: the walk creates a user and emulates systemd")
        with contextlib.suppress(KeyError):
            pwd.getpwnam(self.user)
            raise WalkFailed(f"user {self.user} exists already; the walk wants its own (--user)")
        if self.prefix.exists():
            raise WalkFailed(f"{self.prefix} exists already; the walk wants a fresh tree")
        # What any machine has; the service user must reach the directories below the prefix.
        for skeleton in ("etc/systemd/system", "opt", "usr/local/bin", "var/lib"):
            (self.prefix / skeleton).mkdir(mode=0o755, parents=True)
        os.chmod(self.prefix, 0o755)  # noqa: S103 (as /opt, /etc, /var are)
        for port in (self.submission_port, self.implicit_tls_port, self.metrics_port):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise WalkFailed(f"127.0.0.1:{port} is in use; choose other ports (--help)")
        # The clone as `pip install .` sees it, without the build's leftovers in the work tree.
        shutil.copytree(
            ROOT,
            self.prefix / "src",
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache"
            ),
        )
        # What certbot would have made: a certificate for the hostname (and 127.0.0.1, for the
        # client below), its key readable by root only.
        live = self.at(CERTBOT_LIVE)
        live.mkdir(parents=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(HOSTNAME),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        (live / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(live / "privkey.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        walk = self.prefix / "walk"
        walk.mkdir(mode=0o755)
        (walk / "sandbox_exec.py").write_text(SANDBOX_EXEC)
        os.chmod(walk / "sandbox_exec.py", 0o644)

    def install(self) -> None:
        for line in readme_block("## Operating", "Install"):
            if "systemctl" in line:
                before, _, after = line.partition("&&")
                if "systemctl" in before or "enable --now" not in after:
                    raise WalkFailed(f"cannot emulate: {line}")
                self.shell(self.rewrite(before.strip()))
                self.start()
                continue
            if "check-config" in line and not self.config_edited:
                self.edit_config()  # the operator's edit comes before the check
            self.shell(self.rewrite(line))

    def edit_config(self) -> None:
        path = self.at("/etc/mailrelay/mailrelay.toml")
        text = path.read_text()
        for old, new in (
            ("/etc/mailrelay", str(self.at("/etc/mailrelay"))),
            ("/var/lib/mailrelay", str(self.at("/var/lib/mailrelay"))),
        ):
            text = text.replace(old, new)
        for table, key, value in (
            ("submission", "listen", f'["127.0.0.1:{self.submission_port}"]'),
            ("submission", "implicit_tls_listen", f'["127.0.0.1:{self.implicit_tls_port}"]'),
            ("submission", "allow_unverified_domains", "true"),
            ("delivery", "hold", "true"),
            ("metrics", "listen", f'"127.0.0.1:{self.metrics_port}"'),
        ):
            text = set_key(text, table, key, value)
        path.write_text(text)
        self.config_edited = True
        self.step(f"edit {path}: prefix paths, 127.0.0.1 listeners, hold, unverified domains")

    # ---- systemctl enable --now, emulated ----------------------------------------------------

    def unit(self) -> dict[str, list[str]]:
        path = self.at("/etc/systemd/system") / "mailrelay.service"
        settings: dict[str, list[str]] = {}
        for line in path.read_text().splitlines():
            if "=" in line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
        return settings

    def start(self) -> None:
        if not self.config_edited:
            self.edit_config()
        unit_path = self.at("/etc/systemd/system") / "mailrelay.service"
        unit_path.write_text(self.rewrite_unit(unit_path.read_text()))
        if shutil.which("systemd-analyze"):
            self.shell(f"systemd-analyze verify {unit_path}")
        else:
            self.step("systemd-analyze verify", "not installed here: skipped")
        unit = self.unit()
        user = pwd.getpwnam(unit["User"][0])
        group = unit["Group"][0]
        gid = grp.getgrnam(group).gr_gid
        for name in unit.get("StateDirectory", []):
            state = self.at(f"/var/lib/{name}")
            mode = int(unit.get("StateDirectoryMode", ["0755"])[0], 8)
            state.mkdir(parents=True, exist_ok=True, mode=mode)
            os.chown(state, user.pw_uid, gid)
            os.chmod(state, mode)
            self.step(f"StateDirectory {state}: {user.pw_name}:{group} {mode:04o}")
        for name in unit.get("ConfigurationDirectory", []):
            conf = self.at(f"/etc/{name}")
            mode = int(unit.get("ConfigurationDirectoryMode", ["0755"])[0], 8)
            if not conf.exists():
                conf.mkdir(mode=mode)
                self.step(f"ConfigurationDirectory {conf}: made, root {mode:04o}")
            elif (actual := conf.stat().st_mode & 0o7777) != mode:
                # systemd 252: "... already exists but the mode is different", and goes on.
                self.step(
                    f"ConfigurationDirectory {conf}",
                    f"WARNING: mode {actual:04o}, the unit says {mode:04o}",
                )
            else:
                self.step(f"ConfigurationDirectory {conf}: exists, mode {mode:04o}")
        self.probe(unit, user.pw_uid)
        for command in unit.get("ExecStartPre", []):
            done = self.sandboxed(unit, command)
            output = done.communicate(timeout=120)[0].decode()
            code = done.returncode
            print("\n".join(f"      {x}" for x in output.strip().splitlines()), flush=True)
            if code != 0:
                self.step(f"ExecStartPre={command}", f"FAILED (exit {code})")
                raise WalkFailed(command)
            self.step(f"ExecStartPre={command}")
        [command] = unit["ExecStart"]
        notify = self.prefix / "walk" / "notify"
        # Open for the service's lifetime, as systemd's: it also says RELOADING=1 and STOPPING=1.
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify))
        os.chmod(notify, 0o777)  # noqa: S103 (as systemd's /run/systemd/notify)
        self.service = self.sandboxed(unit, command, notify=notify, log=True)
        self.notify.settimeout(60)
        try:
            while b"READY=1" not in self.notify.recv(4096):
                pass
        except TimeoutError:
            self.step(f"ExecStart={command}", "FAILED: no READY=1 in 60 s")
            raise WalkFailed(command) from None
        self.step(f"ExecStart={command}: READY=1 (Type=notify)")

    def probe(self, unit: dict[str, list[str]], uid: int) -> None:
        """Each emulated setting in force, and a system call outside the filter fatal."""
        walk = self.prefix / "walk"
        (walk / "probe.py").write_text(PROBE)
        read_only = walk / "owned-by-the-service"
        read_only.mkdir(mode=0o700)
        os.chown(read_only, uid, -1)
        marker = Path(TMP_DIRS[0]) / f"mailrelay-walk-marker-{os.getpid()}"
        marker.touch()
        try:
            state = self.at(f"/var/lib/{unit['StateDirectory'][0]}")
            command = shlex.join(["/usr/bin/python3", str(walk / "probe.py"), str(state)])
            done = self.sandboxed(unit, f"{command} {read_only} {marker}")
            output = done.communicate(timeout=60)[0].decode().strip()
        finally:
            marker.unlink()
        if done.returncode != 0:
            self.step("the sandbox", f"FAILED: {output}")
            raise WalkFailed(output)
        self.step(f"the sandbox: {output}")
        if self.seccomp_rules(unit)[0]:
            chown = "/usr/bin/python3 -c 'import os; os.chown(\"/\", -1, -1)'"
            done = self.sandboxed(unit, chown)
            done.communicate(timeout=60)
            if done.returncode != -signal.SIGSYS:
                self.step("the sandbox: chown()", f"FAILED: exit {done.returncode}, not SIGSYS")
                raise WalkFailed("chown() was not killed")
            self.step("the sandbox: chown() (@privileged) is killed with SIGSYS")

    def rewrite_unit(self, text: str) -> str:
        """The unit as the walk runs it: its paths under the prefix, its user the walk's."""
        lines = []
        for line in text.splitlines():
            if line.startswith(("User=", "Group=")):
                line = line.split("=", 1)[0] + "=" + self.user
            elif line.startswith(("StateDirectory=", "ConfigurationDirectory=")):
                pass  # names below /var/lib and /etc; the walk maps them itself
            elif not line.startswith("#"):
                for path in PATHS:
                    line = line.replace(path, str(self.at(path)))
            lines.append(line)
        return "\n".join(lines) + "\n"

    def sandboxed(
        self,
        unit: dict[str, list[str]],
        command: str,
        *,
        notify: Path | None = None,
        log: bool = False,
    ) -> subprocess.Popen[bytes]:
        """`command` as the unit would run it; its stdout and stderr merged, as in the journal."""
        writable = [self.at(f"/var/lib/{n}") for n in unit.get("StateDirectory", [])]
        for value in unit.get("ReadWritePaths", []):
            writable += [Path(p) for p in value.split() if Path(p) not in writable]
        script = ["set -e"]
        if unit.get("PrivateTmp") == ["yes"]:
            # A fresh /tmp and /var/tmp; the walk's own tree, if it is below one, is put back.
            below_tmp = any(str(self.prefix).startswith(f"{tmp}/") for tmp in TMP_DIRS)
            if below_tmp:
                script.append(f"mkdir -p {HOLD}; mount --bind {self.prefix} {HOLD}")
            for tmp in TMP_DIRS:
                script.append(f"mount -t tmpfs -o mode=1777 tmpfs {tmp}")
            if below_tmp:
                script.append(f"mkdir -p {self.prefix}; mount --bind {HOLD} {self.prefix}")
        if unit.get("ProtectHome") == ["yes"]:
            for home in ("/root", "/home", "/run/user"):
                script.append(f"if [ -d {home} ]; then mount -t tmpfs -o mode=000 tmpfs {home}; fi")
        if unit.get("ProtectSystem") == ["strict"]:
            keep = {*TMP_DIRS, *(str(p) for p in writable)}
            script.append(
                'findmnt -rn -o TARGET | while read -r m; do case "$m" in'
                " /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) ;;"
                f" {'|'.join(sorted(keep))}) ;;"
                ' *) mount -o remount,bind,ro "$m" 2>/dev/null || true;; esac; done'
            )
            for path in writable:
                script.append(f"mount --bind {path} {path}; mount -o remount,bind,rw {path}")
        caps = [c.lower() for c in " ".join(unit.get("AmbientCapabilities", [])).split()]
        bounding = [c.lower() for c in " ".join(unit.get("CapabilityBoundingSet", [])).split()]
        setpriv = [
            "setpriv",
            "--reuid",
            unit["User"][0],
            "--regid",
            unit["Group"][0],
            "--init-groups",
        ]
        if caps:
            names = ",".join("+" + c.removeprefix("cap_") for c in caps)
            setpriv += ["--inh-caps", names, "--ambient-caps", names]
        if bounding:
            setpriv += [
                "--bounding-set",
                "-all," + ",".join("+" + c.removeprefix("cap_") for c in bounding),
            ]
        if unit.get("NoNewPrivileges") == ["yes"]:
            setpriv.append("--no-new-privs")
        umask = unit.get("UMask", ["0022"])[0]
        mdwe = "yes" if unit.get("MemoryDenyWriteExecute") == ["yes"] else "no"
        allow, families = self.seccomp_rules(unit)
        # setpriv resolves the program with root's rights still in hand: run /bin/sh first, so
        # that the service's program is found and opened as the service user, as systemd does.
        wrapped = [
            *setpriv,
            "--",
            "/usr/bin/python3",
            str(self.prefix / "walk" / "sandbox_exec.py"),
            umask,
            mdwe,
            families,
            allow,
            *shlex.split(command),
        ]
        script.append("cd /; exec " + shlex.join(wrapped))
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify)
        out = open(self.prefix / "walk" / "serve.log", "wb") if log else subprocess.PIPE  # noqa: SIM115
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(script)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def seccomp_rules(self, unit: dict[str, list[str]]) -> tuple[str, str]:
        """SystemCallFilter= as systemd resolves it (an allow list, minus the ~ lines, plus what
        it always allows) and RestrictAddressFamilies= as numbers; empty without python3-seccomp."""
        if self.seccomp is None:
            self.seccomp = self.resolve_seccomp(unit)
        return self.seccomp

    def resolve_seccomp(self, unit: dict[str, list[str]]) -> tuple[str, str]:
        filters = unit.get("SystemCallFilter", [])
        if not filters:
            return "", ""
        has_seccomp = subprocess.run(
            ["/usr/bin/python3", "-c", "import seccomp"], capture_output=True, check=False
        )
        if has_seccomp.returncode != 0 or not shutil.which("systemd-analyze"):
            self.step("SystemCallFilter=", "not emulated: apt-get install python3-seccomp")
            return "", ""
        allow: set[str] = set()
        deny: set[str] = set()
        for value in filters:
            target = deny if value.startswith("~") else allow
            for item in value.removeprefix("~").split():
                target |= syscall_set(item)
        allow |= syscall_set("@default") | {"execve", "exit", "exit_group", "getrlimit"}
        allow |= {"rt_sigreturn"}
        families = []
        for name in " ".join(unit.get("RestrictAddressFamilies", [])).split():
            families.append(str(int(getattr(socket, name))))
        self.step("SystemCallFilter= and RestrictAddressFamilies=", "emulated with seccomp")
        return ",".join(sorted(allow - deny)), ",".join(families)

    # ---- after the start ---------------------------------------------------------------------

    def domains(self) -> None:
        for line in readme_block("## Sending domains", None):
            if "domain check" in line:
                self.step(line, "not run: it asks public DNS for records nobody published")
                continue
            if "user add" in line:
                line = line.split("#")[0].strip() + " --password-stdin"
                self.shell(self.rewrite(line), stdin=PASSWORD + "\n")
                continue
            self.shell(self.rewrite(line))

    def send(self) -> None:
        context = ssl.create_default_context(cafile=str(self.at(CERTBOT_LIVE) / "fullchain.pem"))
        message = (
            b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: walk\r\n\r\nhello\r\n"
        )
        with smtplib.SMTP("127.0.0.1", self.submission_port, timeout=30) as smtp:
            smtp.starttls(context=context)
            smtp.login("alice@example.org", PASSWORD)
            refused = smtp.sendmail("alice@example.org", ["bob@example.net"], message)
        if refused:
            raise WalkFailed(f"refused: {refused}")
        self.step(f"smtplib: STARTTLS on 127.0.0.1:{self.submission_port}, AUTH, message accepted")
        with smtplib.SMTP_SSL(
            "127.0.0.1", self.implicit_tls_port, context=context, timeout=30
        ) as smtp:
            smtp.login("alice@example.org", PASSWORD)
        self.step(f"smtplib: implicit TLS on 127.0.0.1:{self.implicit_tls_port}, AUTH")
        listing = self.shell("mailrelay queue list")
        if "bob@example.net" not in listing:
            raise WalkFailed("queue list does not show the message")
        database = self.at("/var/lib/mailrelay/mailrelay.sqlite3")
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            [(data,)] = conn.execute("SELECT data FROM messages").fetchall()
        finally:
            conn.close()
        if b"DKIM-Signature:" not in data:
            raise WalkFailed("the queued message is not DKIM-signed")
        self.step("the queued message is DKIM-signed (the service read the key)")
        user = pwd.getpwnam(self.user).pw_uid
        state = self.at("/var/lib/mailrelay")
        strays = [p for p in [state, *state.rglob("*")] if p.lstat().st_uid != user]
        if strays:
            self.step("ownership of the state directory", f"FAILED: {strays}")
            raise WalkFailed("files in the state directory the service does not own")
        self.step(f"every file in {state} is {self.user}'s")

    def reload_and_stop(self) -> None:
        assert self.service is not None
        # unshare and setpriv exec, they do not fork: the process started is the service's.
        main = self.service.pid
        os.kill(main, signal.SIGHUP)  # ExecReload=/bin/kill -HUP $MAINPID
        log = self.prefix / "walk" / "serve.log"
        deadline = time.monotonic() + 10
        while b"event=tls_reloaded" not in log.read_bytes():
            if time.monotonic() > deadline:
                raise WalkFailed("no event=tls_reloaded after SIGHUP")
            time.sleep(0.2)
        self.step("reload (SIGHUP): event=tls_reloaded")
        os.kill(main, signal.SIGTERM)
        code = self.service.wait(timeout=30)  # TimeoutStopSec=30
        self.service = None
        assert self.notify is not None
        self.notify.settimeout(0)
        said = []
        with contextlib.suppress(BlockingIOError):
            while True:
                said.append(self.notify.recv(4096))
        if not any(b"STOPPING=1" in m for m in said):
            raise WalkFailed(f"no STOPPING=1 on the notify socket: {said}")
        if code != 0:
            raise WalkFailed(f"serve exited {code} on SIGTERM")
        self.step("stop (SIGTERM): STOPPING=1, exit 0")

    def clean_up(self) -> None:
        if self.notify is not None:
            self.notify.close()
        if self.service is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.service.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.service.wait(timeout=30)
            if self.service.poll() is None:
                self.service.kill()
        with contextlib.suppress(KeyError):
            pwd.getpwnam(self.user)
            subprocess.run(["userdel", self.user], check=False)
        shutil.rmtree(self.prefix, ignore_errors=True)
        with contextlib.suppress(OSError):
            HOLD.rmdir()


def set_key(text: str, table: str, key: str, value: str) -> str:
    """`key = value` in `[table]` of a TOML text: the line replaced where the key is set there,
    else added below the table's header (which must exist)."""
    header = re.search(rf"^\[{re.escape(table)}\][^\n]*\n", text, flags=re.M)
    if header is None:
        raise WalkFailed(f"the example config has no [{table}] table")
    end = re.search(r"^\[", text[header.end() :], flags=re.M)
    stop = header.end() + (end.start() if end else len(text) - header.end())
    body, n = re.subn(
        rf"^{key} = .*$", f"{key} = {value}", text[header.end() : stop], count=1, flags=re.M
    )
    if n == 0:
        body = f"{key} = {value}\n" + body
    return text[: header.end()] + body + text[stop:]


def syscall_set(name: str) -> set[str]:
    if not name.startswith("@"):
        return {name}
    listed = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in listed.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        names |= syscall_set(item) if item.startswith("@") else {item}
    return names


def readme_block(section: str, after: str | None) -> list[str]:
    """The shell lines of the first ```sh block of `section` (after the line starting with
    `after`), continuation lines joined and comments dropped."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(section + "\n") :]
    body = body[: body.find("\n## ", 1)] if "\n## " in body[1:] else body
    if after is not None:
        body = body[body.index(after) :]
    block = body[body.index("```sh\n") + 6 :]
    block = block[: block.index("```")]
    lines = []
    for raw in block.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            lines.append(line)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", type=Path, default=Path("/tmp/mailrelay-walk"))  # noqa: S108
    p.add_argument("--user", default="mailrelay-walk")
    p.add_argument("--submission-port", type=int, default=587)
    p.add_argument("--implicit-tls-port", type=int, default=465)
    p.add_argument("--metrics-port", type=int, default=9187)
    p.add_argument("--keep", action="store_true", help="keep the user and the tree")
    args = p.parse_args()
    walk = Walk(
        args.prefix.resolve(),
        args.user,
        args.submission_port,
        args.implicit_tls_port,
        args.metrics_port,
    )
    failed = None
    try:
        walk.prepare()
        walk.install()
        walk.domains()
        walk.send()
        walk.reload_and_stop()
    except (WalkFailed, OSError, subprocess.SubprocessError, smtplib.SMTPException) as exc:
        failed = exc
    finally:
        if args.keep:
            print(f"walk: kept {walk.prefix} and user {walk.user}", flush=True)
        else:
            walk.clean_up()
    return summary(walk.steps, failed)


def summary(steps: list[tuple[str, str]], failed: BaseException | None) -> int:
    """Print every step's outcome and the verdict; the exit status."""
    print("\nwalk summary:")
    for what, outcome in steps:
        print(f"  {what}: {outcome}" if outcome != "ok" else f"  {what}")
    if failed is not None:
        print(f"walk: FAILED: {failed}", file=sys.stderr)
        return 1
    print("walk: every step worked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
