"""A real Docker daemon inside a testbed node, for the end-to-end tests of `container:` services.

Why inside the node and not on the host: a container service runs `docker run --network host`,
and "host" is the network namespace of the daemon that starts the container. A testbed node
has its own network namespace (its own loopback and its own address on the testbed bridge),
so only a daemon in the node puts the engine on the node's 127.0.0.1:PORT, where deploy's
health wait, verify and the router look for it. It also keeps the whole daemon inside the
node's namespaces and cgroup: the testbed's teardown kills it with the node.

    with DockerNode(tb.node("node1")) as docker:
        docker.import_rootfs(tarball, "clusterctl-test/llama-server:1")

The daemon, in the node:

- runs as the transient systemd unit `cct<RUN_ID>-dockerd.service` (named after the testbed's
  run id), so the node's systemd owns it and `close()` stops exactly it;
- listens on the node's default socket, `/run/docker.sock` (the node's own tmpfs), so that
  the `docker` command line in a rendered unit reaches it as on a real machine;
- keeps its state in `<RUN_DIR>/docker-<NODE>` on the host's disk, bind-mounted into the node
  at `DATA_MOUNT` (overlay2 needs a real file system under it: the node's root is an overlay
  itself; on anything but ext4 or xfs it falls back to the vfs driver), and its exec root and
  pidfile under the node's `/run`; its configuration file is an empty one of its own, so the
  host's /etc/docker/daemon.json does not apply;
- touches no host network state: `--bridge=none --iptables=false --ip6tables=false
  --ip-forward=false --ip-masq=false` (containers use `--network host`, the node's network).

`close()` removes every container, stops the unit, unmounts the data folder in the node and
deletes it on the host; the testbed's own teardown removes the run directory in any case.
Images come from a root file system tarball (`docker import`): no registry is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from types import TracebackType

from tests.e2e.testbed import Node, TestbedError

DOCKER = "/usr/bin/docker"  # what rendered units run (containerise: /usr/bin/RUNTIME)
DOCKERD = "/usr/sbin/dockerd"
DATA_MOUNT = "/var/lib/clusterctl-test-docker"
SOCKET = "/run/docker.sock"
EXEC_ROOT = "/run/clusterctl-test-docker"
OVERLAY_OK = ("ext2/ext3", "xfs")  # `stat -f -c %T` of file systems overlay2 works on


class DockerNodeError(TestbedError):
    """The node's Docker daemon could not be started, reached or removed; the message says why."""


def _run(argv: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DockerNodeError(f"{shlex.join(argv)} did not finish in {timeout:g} s") from exc


class DockerNode:
    """dockerd in one testbed node (systemd nodes only); a context manager."""

    def __init__(self, node: Node, *, start_timeout: float = 60.0) -> None:
        self.node = node
        self.unit = f"cct{node.testbed.run_id}-dockerd.service"
        self.host_dir = node.testbed.run_dir / f"docker-{node.name}"
        self.start_timeout = start_timeout
        self.storage_driver = ""
        self._mounted = False
        self._started = False

    def __enter__(self) -> DockerNode:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except DockerNodeError:
            if exc_type is None:
                raise

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> DockerNode:
        if self.node.testbed.manager != "systemd":
            raise DockerNodeError("the node's dockerd runs as a systemd unit: the node needs systemd")
        for program in (DOCKER, DOCKERD):
            if not Path(program).exists():
                raise DockerNodeError(f"{program} is missing: install docker.io (tools/test.sh does)")
        try:
            self._mount_data()
            self._start_daemon()
            self._wait_ready()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every container, stop the daemon, unmount and delete its data. Idempotent."""
        problems: list[str] = []
        alive = self.node.pid and Path(f"/proc/{self.node.pid}").exists()
        if alive and self._started:
            ids = self.docker("ps", "--all", "--quiet").stdout.split()
            if ids and self.docker("rm", "--force", *ids).returncode != 0:
                problems.append(f"containers {' '.join(ids)} not removed")
            stop = self.node.run(["systemctl", "stop", self.unit], timeout=90)
            if stop.returncode != 0:
                problems.append(f"systemctl stop {self.unit}: {stop.stderr.strip()}")
            state = self.node.run(["systemctl", "show", "-p", "ActiveState", "--value", self.unit]).stdout.strip()
            if state not in ("inactive", "failed"):
                problems.append(f"{self.unit} is still {state}")
            self.node.run(["systemctl", "reset-failed", self.unit])
        self._started = False
        if alive and self._mounted:
            # --recursive: dockerd bind-mounts its data root onto itself
            umount = self._in_mount_ns(["umount", "--recursive", str(self.node.root) + DATA_MOUNT])
            if umount.returncode != 0:
                problems.append(f"umount {DATA_MOUNT} in {self.node.name}: {umount.stderr.strip()}")
        self._mounted = False
        if self.host_dir.exists():
            rm = _run(["rm", "-rf", "--one-file-system", str(self.host_dir)], timeout=120)
            if rm.returncode != 0 or self.host_dir.exists():
                problems.append(f"{self.host_dir} not removed: {rm.stderr.strip()}")
        if problems:
            raise DockerNodeError(f"{self.node.name}: dockerd teardown left: " + "; ".join(problems))

    # -- using it -----------------------------------------------------------------------------

    def docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` in the node, against its daemon (the node's default socket)."""
        return self.node.run([DOCKER, "--host", f"unix://{SOCKET}", *args], timeout=timeout)

    def import_rootfs(self, tarball: Path, tag: str, *, env_path: str = "/usr/local/bin:/usr/bin:/bin",
                      entrypoint: tuple[str, ...] = (), timeout: float = 300) -> str:
        """`docker import` of a root file system tarball as image `tag`, with PATH `env_path` and
        the ENTRYPOINT `entrypoint` (none when empty); returns the image id."""
        images = self.host_dir / "images"
        images.mkdir(exist_ok=True)
        copy = images / tarball.name
        if not copy.exists():  # where the node sees it: its data folder (a hard link if it can be)
            try:
                os.link(tarball, copy)
            except OSError:
                shutil.copyfile(tarball, copy)
        changes = ["--change", f"ENV PATH={env_path}"]
        if entrypoint:
            changes += ["--change", f"ENTRYPOINT {json.dumps(list(entrypoint))}"]
        r = self.docker("import", *changes, f"{DATA_MOUNT}/images/{tarball.name}", tag, timeout=timeout)
        if r.returncode != 0:
            raise DockerNodeError(f"docker import {tag}: {r.stderr.strip()}")
        return r.stdout.strip()

    def containers(self, name: str) -> list[dict[str, str]]:
        """Every container (running or not) named exactly `name`: docker ps's JSON lines."""
        r = self.docker("ps", "--all", "--no-trunc", "--filter", f"name=^{name}$", "--format", "{{json .}}")
        if r.returncode != 0:
            raise DockerNodeError(f"docker ps: {r.stderr.strip()}")
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    # -- steps --------------------------------------------------------------------------------

    def _in_mount_ns(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """`argv` in the node's mount namespace but with the host's paths (its root is NODE/merged)."""
        return _run(["nsenter", "-t", str(self.node.pid), "-m", "--", *argv])

    def _mount_data(self) -> None:
        self.host_dir.mkdir(mode=0o700)
        (self.host_dir / "daemon.json").write_text("{}\n")
        fstype = _run(["stat", "-f", "-c", "%T", str(self.host_dir)]).stdout.strip()
        self.storage_driver = "overlay2" if fstype in OVERLAY_OK else "vfs"
        target = str(self.node.root) + DATA_MOUNT
        self.node.run(["mkdir", "-p", DATA_MOUNT], check=True)
        r = self._in_mount_ns(["mount", "--bind", str(self.host_dir), target])
        if r.returncode != 0:
            raise DockerNodeError(f"bind-mounting {self.host_dir} at {DATA_MOUNT} in {self.node.name}: "
                                  f"{r.stderr.strip()}")
        self._mounted = True
        seen = self.node.run(["findmnt", "--noheadings", "--output", "FSTYPE", "--mountpoint", DATA_MOUNT])
        if seen.stdout.strip() in ("", "overlay", "tmpfs") and self.storage_driver == "overlay2":
            raise DockerNodeError(f"{DATA_MOUNT} in {self.node.name} is {seen.stdout.strip() or 'not a mount'}, "
                                  f"not the host's {fstype} folder")

    def _start_daemon(self) -> None:
        argv = ["systemd-run", "--unit", self.unit, "--description", "dockerd for the container tests",
                "--property", "KillMode=mixed", "--property", "TimeoutStopSec=60", "--",
                DOCKERD, "--config-file", f"{DATA_MOUNT}/daemon.json", "--data-root", f"{DATA_MOUNT}/data",
                "--exec-root", EXEC_ROOT, "--pidfile", f"{EXEC_ROOT}.pid", "--host", f"unix://{SOCKET}",
                "--storage-driver", self.storage_driver, "--bridge=none", "--iptables=false",
                "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"]
        r = self.node.run(argv)
        if r.returncode != 0:
            raise DockerNodeError(f"starting {self.unit} in {self.node.name}: {r.stderr.strip()}")
        self._started = True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            info = self.docker("info", "--format", "{{.Driver}}", timeout=30)
            if info.returncode == 0:
                if info.stdout.strip() != self.storage_driver:
                    raise DockerNodeError(f"dockerd uses {info.stdout.strip()!r}, not {self.storage_driver!r}")
                return
            state = self.node.run(["systemctl", "show", "-p", "ActiveState", "--value", self.unit]).stdout.strip()
            if state not in ("active", "activating") or time.monotonic() > deadline:
                journal = self.node.run(["journalctl", "--no-pager", "-n", "20", "-u", self.unit]).stdout
                raise DockerNodeError(f"dockerd in {self.node.name} is not ready ({state}): {info.stderr.strip()}"
                                      f"\n{journal}")
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# images from files on this machine


def _ldd(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads and its program interpreter (ld.so), as `ldd` lists them."""
    r = _run(["ldd", str(binary)])
    if r.returncode != 0:
        raise DockerNodeError(f"ldd {binary}: {(r.stderr or r.stdout).strip()}")
    found: list[Path] = []
    for line in r.stdout.splitlines():
        words = line.split()
        if "=>" in words:
            target = words[words.index("=>") + 1]
            if target == "not":
                raise DockerNodeError(f"{binary}: {line.strip()}")
            found.append(Path(target))
        elif words and words[0].startswith("/"):
            found.append(Path(words[0]))  # the interpreter, e.g. /lib64/ld-linux-x86-64.so.2
    return found


def binary_rootfs(binary: Path, out_dir: Path) -> Path:
    """A root file system tarball holding `binary` as /usr/local/bin/NAME, every library `ldd`
    lists at the path it lists it under (dereferenced), and an empty /tmp. Its name carries a hash
    of the content, so an existing one is reused."""
    libs = _ldd(binary)
    digest = hashlib.sha256()
    for path in (binary, *libs):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    out = out_dir / f"{binary.name}-rootfs-{digest.hexdigest()[:16]}.tar"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".tar.partial")
    with tarfile.open(partial, "w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        for directory in ("tmp",):
            add_dir(directory, 0o1777)
        tar.add(str(binary), arcname=f"usr/local/bin/{binary.name}")
        for lib in libs:
            tar.add(str(lib.resolve()), arcname=str(lib).lstrip("/"))
    partial.rename(out)
    return out


def _ldd_many(files: list[Path]) -> set[Path]:
    """The shared libraries (and program interpreters) that `files` load, as `ldd` lists them; a
    file that is no dynamic object, or a library `ldd` does not find, adds nothing."""
    found: set[Path] = set()
    for start in range(0, len(files), 64):
        r = _run(["ldd", *map(str, files[start:start + 64])], timeout=300)
        for line in r.stdout.splitlines():
            words = line.split()
            if "=>" in words:
                target = words[words.index("=>") + 1]
                if target.startswith("/"):
                    found.add(Path(target))
            elif words and words[0].startswith("/") and not line.endswith(":"):
                found.add(Path(words[0]))
    return found


def _merged_usr(path: Path) -> str:
    """`path` in an image with a merged /usr (/bin, /lib, /lib64 link to /usr/...): its folder
    resolved, its own name kept (a library's soname link)."""
    return str(Path(os.path.realpath(path.parent)) / path.name).lstrip("/")


def python_rootfs(venv: Path, image_venv: str, out: Path, *, python: Path = Path("/usr/bin/python3"),
                  programs: tuple[str, ...] = ()) -> Path:
    """A root file system tarball `out` holding the venv `venv` at `image_venv` (its scripts'
    `#!` lines rewritten to it), the Python it was made with (`python`: its executable and its
    standard library), `programs` (e.g. /bin/sh), every library those and the venv's extension
    modules load (`ldd`), a merged /usr, a root user and an empty /tmp. Written to OUT.partial
    first and renamed, so an existing `out` is complete."""
    real = Path(os.path.realpath(python))
    query = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
    if query.returncode != 0:
        raise DockerNodeError(f"{python}: {query.stderr.strip()}")
    stdlib = Path(query.stdout.strip())
    objects = [real, *(Path(os.path.realpath(shutil.which(p) or p)) for p in programs)]
    venv_objects = [p for p in venv.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    libs = _ldd_many(objects + list(stdlib.rglob("*.so")) + venv_objects)
    libs = {lib for lib in libs if not lib.resolve().is_relative_to(venv.resolve())}
    old_prefix = str(venv).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_link(name: str, target: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)

        def add_text(name: str, text: str) -> None:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        add_dir("tmp", 0o1777)
        add_dir("root", 0o700)
        for d in ("etc", "usr", "usr/bin", "usr/lib", "usr/lib64"):
            add_dir(d)
        for name in ("bin", "lib", "lib64"):
            add_link(name, f"usr/{name}")
        add_text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        add_text("etc/group", "root:x:0:\n")
        for program in programs:
            tar.add(os.path.realpath(shutil.which(program) or program), arcname=_merged_usr(Path(program)))
        tar.add(str(real), arcname=_merged_usr(real))
        if python.name != real.name:
            add_link(_merged_usr(python), real.name)
        tar.add(str(stdlib), arcname=_merged_usr(stdlib),
                filter=lambda info: None if "/site-packages" in info.name or "/dist-packages" in info.name
                else info)
        for lib in sorted(libs):
            tar.add(os.path.realpath(lib), arcname=_merged_usr(lib))
        for path in sorted(venv.rglob("*")):
            arcname = image_venv.lstrip("/") + "/" + str(path.relative_to(venv))
            info = tar.gettarinfo(str(path), arcname)
            if info.isfile() and path.parent == venv / "bin":
                data = path.read_bytes()
                if data.startswith(b"#!" + old_prefix):
                    data = data.replace(old_prefix, image_venv.encode())
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif info.isfile():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    partial.rename(out)
    return out
