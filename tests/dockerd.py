"""A second Docker engine beside the main one (FACTS.md): its own socket, data root, exec root and
pidfile, configured by a daemon.json; stopped by its own pid. The main engine is never touched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path


class SecondEngine:
    def __init__(self, base: Path, config: dict) -> None:
        self.base = base
        self.config = config
        self.socket = base / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None

    def docker(self, *args: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(["docker", "-H", self.host, *args], capture_output=True, text=True, timeout=timeout,
                                **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr}")
        return result

    def start(self) -> "SecondEngine":
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "daemon.json").write_text(json.dumps(self.config, indent=2))
        with open(self.base / "dockerd.log", "w") as log:  # the engine keeps its own copy of the file
            self.proc = subprocess.Popen(
                ["dockerd", "--config-file", str(self.base / "daemon.json"), "--host", self.host,
                 "--data-root", str(self.base / "data"), "--exec-root", str(self.base / "exec"),
                 "--pidfile", str(self.base / "docker.pid"), "--bridge=none", "--iptables=false"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(120):
            if self.proc.poll() is not None:
                raise AssertionError(f"the second dockerd exited: {(self.base / 'dockerd.log').read_text()[-2000:]}")
            if self.docker("info", check=False, timeout=10).returncode == 0:
                return self
            time.sleep(0.5)
        raise AssertionError(f"the second dockerd did not answer: {(self.base / 'dockerd.log').read_text()[-2000:]}")

    def load(self, *images: str) -> None:
        """Copy images from the main engine (no registry is reachable), in one archive: the layers
        they share travel once."""
        images = tuple(i for i in images if self.docker("image", "inspect", i, check=False).returncode != 0)
        if not images:
            return
        with subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE) as save:
            subprocess.run(["docker", "-H", self.host, "load", "-q"], stdin=save.stdout, check=True,
                           capture_output=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.docker("swarm", "leave", "--force", check=False, timeout=60)
        pid = self.proc.pid
        try:
            os.kill(pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        # Mounts the engine left under its own directories (none are the main engine's).
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            where = line.split()[1]
            if where.startswith(str(self.base)):
                subprocess.run(["umount", "-l", where], check=False)
        shutil.rmtree(self.base / "data", ignore_errors=True)
        shutil.rmtree(self.base / "exec", ignore_errors=True)
        self.proc = None
