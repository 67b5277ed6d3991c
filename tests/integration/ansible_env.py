"""The real ansible-core around the corehost.hvagent collection for tests: the collection
built with `ansible-galaxy collection build` and installed offline from its tarball into
a temporary collections path, and playbooks run with `ansible-playbook` against
localhost (connection local, this interpreter), every ANSIBLE_* directory temporary.

A playbook's task results come back through `register`: the tasks run in a block whose
`always` writes every registered result to a JSON file (a task that is not changed
itself), so a failed task still reports, and the PLAY RECAP counts only the tasks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COLLECTION_SRC = REPO / "ansible" / "corehost" / "hvagent"
BIN = Path(sys.executable).parent
TIMEOUT = 600
RECAP_RE = re.compile(r"^localhost\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.M)


@dataclass
class Played:
    rc: int
    results: list[dict[str, Any] | None]
    recap: dict[str, int]
    stdout: str
    stderr: str

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.results[i]
        assert r is not None, f"task {i} did not run:\n{self.stdout}\n{self.stderr}"
        return r


class AnsibleEnv:
    """ansible-core commands with a private environment under `root`."""

    def __init__(self, root: Path, hvctl_dir: Path) -> None:
        self.root = root
        self.collections = root / "collections"
        for d in ("home", "tmp", "remote", "dist", "plays"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")},
            "ANSIBLE_HOME": str(root / "home"),
            "ANSIBLE_LOCAL_TEMP": str(root / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(root / "remote"),
            "ANSIBLE_COLLECTIONS_PATH": str(self.collections),
            # Only the installed tarball, never a copy found on sys.path.
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
            "ANSIBLE_CONFIG": str(root / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_STDOUT_CALLBACK": "default",
            "HVCTL_CONFIG_DIR": str(hvctl_dir),
        }
        (root / "ansible.cfg").write_text("[defaults]\n")

    def run(self, tool: str, *args: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=self.root,
                              timeout=TIMEOUT, check=False)

    def install_collection(self) -> Path:
        """Build the collection from the source tree and install the tarball offline."""
        dist = self.root / "dist"
        r = self.run("ansible-galaxy", "collection", "build", str(COLLECTION_SRC),
                     "--output-path", str(dist), "--force")
        assert r.returncode == 0, r.stdout + r.stderr
        (tarball,) = dist.glob("corehost-hvagent-*.tar.gz")
        r = self.run("ansible-galaxy", "collection", "install", "--offline",
                     "-p", str(self.collections), str(tarball))
        assert r.returncode == 0, r.stdout + r.stderr
        return tarball

    def play(self, tasks: list[dict[str, Any]], *args: str) -> Played:
        """Run `tasks` on localhost; `args` go to ansible-playbook (--check, --diff)."""
        plays = self.root / "plays"
        n = len(list(plays.glob("play*.yml")))
        out = plays / f"results{n}.json"
        registered = [{**t, "register": f"r{i}"} for i, t in enumerate(tasks)]
        collect = "[" + ", ".join(f"r{i} | default(none)" for i in range(len(tasks))) + "]"
        playbook = [{
            "hosts": "all", "gather_facts": False,
            "tasks": [{"block": registered, "always": [{
                "name": "collect the results",
                "ansible.builtin.copy": {"dest": str(out),
                                         "content": "{{ " + collect + " | to_json }}"},
                "check_mode": False, "diff": False, "changed_when": False}]}],
        }]
        path = plays / f"play{n}.yml"
        path.write_text(yaml.safe_dump(playbook, sort_keys=False))
        r = self.run("ansible-playbook", "-i", "localhost,", "-e", "ansible_connection=local",
                     "-e", f"ansible_python_interpreter={sys.executable}", *args, str(path))
        m = RECAP_RE.search(r.stdout)
        assert m, f"no PLAY RECAP:\n{r.stdout}\n{r.stderr}"
        recap = {k: int(v) for k, v in (kv.split("=") for kv in m["counts"].split())}
        results = json.loads(out.read_text()) if out.exists() else []
        return Played(r.returncode, results, recap, r.stdout, r.stderr)
