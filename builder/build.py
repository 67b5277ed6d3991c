"""One image build, start to finish, all-or-nothing.

Work happens in a temp dir under the output root (same file system); the finished
directory replaces out/<profile>/ by rename only when everything succeeded, so a failed
or interrupted build leaves the previous output untouched. When the input hash equals
the last successful build's (and its artifacts are intact) the build is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from builder import base, dib, hostcompat, inputs, late, layer, outputs, render
from builder.paths import display, repo_root
from builder.profile import Profile
from builder.progress import Progress

log = logging.getLogger(__name__)


class BuildError(Exception):
    """A build that could not finish; the message names the failing step."""


@dataclass(frozen=True)
class BuildResult:
    outdir: Path
    reused: bool
    manifest: dict[str, Any]


def plan(profile: Profile) -> tuple[list[Path], bool, inputs.Inputs]:
    """(element closure, whether the agent wheels are needed, input hash)."""
    try:
        closure = render.element_closure([*profile.build_elements, render.OVERLAY_DEPS])
    except render.RenderError as e:
        raise profile.error("elements", str(e)) from None
    with_agent = any(p.name == "hvagent" for p in closure)
    # The agent's source is an input only of images that carry the agent.
    agent = inputs.agent_source_hash() if with_agent else None
    return closure, with_agent, inputs.input_hash(profile, closure, agent)


def dry_run_command(profile: Profile, out_root: Path) -> dib.DibCommand:
    return dib.dib_command(profile, out_root.resolve() / f".{profile.name}.build-XXXXXXXX")


@contextlib.contextmanager
def _lock(out_root: Path, name: str) -> Iterator[None]:
    with open(out_root / f".{name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another build of {name} is running in {display(out_root)}") from None
        yield


def build(profile: Profile, out_root: Path, *, force: bool = False,
          progress: Progress | None = None) -> BuildResult:
    out_root.mkdir(parents=True, exist_ok=True)
    out_root = out_root.resolve()  # DIB changes directories; give it absolute paths
    final = out_root / profile.name
    progress = progress or Progress(f"build {profile.name}")
    with _lock(out_root, profile.name):
        closure, with_agent, wanted = plan(profile)
        if not force:
            ok, why = outputs.reusable(final, wanted)
            if ok:
                manifest = outputs.read_manifest(final) or {}
                return BuildResult(final, True, manifest)
            progress.note(f"building {profile.name}: {why}")
        started = time.monotonic()
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        tmp = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{profile.name}.build-"))
        try:
            result = tmp / "result"
            for d in (result, tmp / "dib", tmp / "dibtmp"):
                d.mkdir()
            cmd = dib.dib_command(profile, tmp)
            dib_base = tmp / "dib" / profile.name
            key, late_list = base_key(profile, closure, with_agent, cmd, tmp)
            try:
                late_now = late.contents(profile, late_list)
            except render.RenderError as e:
                raise BuildError(str(e)) from None
            late_digest = late.digest(late_now)
            agent_source = wanted.parts["agent_source"]
            layered: dict[str, Any] | None = None
            with base.locked(key.digest):
                cached = None if force else base.lookup(key.digest)
                if cached is None:
                    progress.note(f"base {key.digest[:16]}: " + (
                        "--force, building it again" if force else "not cached, building it"))
                    cached = _build_base(profile, tmp, cmd, key, agent_source, late_digest,
                                         progress)
                    reused = False
                else:
                    progress.note(f"base {key.digest[:16]}: reusing the one built "
                                  f"{cached.meta.get('stored', '?')} (DIB took "
                                  f"{cached.meta.get('dib_duration_s', '?')} s)")
                    try:
                        base.materialise(cached, dib_base)
                    except base.BaseCacheError as e:
                        raise BuildError(f"base cache: {e}") from None
                    reused = True
                # Under the lock: another build may prune the entry once it is released.
                shutil.copyfile(cached.path / "dib.log", result / "dib.log")
            new_agent = reused and with_agent and cached.meta.get("agent_source") != agent_source
            new_late = reused and cached.meta.get("late_files") != late_digest
            if new_agent or new_late:
                progress.note("laying onto the base: " + " and ".join(
                    (["the agent (its source changed)"] if new_agent else [])
                    + (["the late files (one changed)"] if new_late else [])))
                try:
                    wheel = render.agent_wheel(tmp / "wheel") if new_agent else None
                    layered = layer.apply(dib_base, wheel, late_now if new_late else {},
                                          [p.name for p in closure], progress.note)
                except (render.RenderError, layer.LayerError) as e:
                    raise BuildError(f"layer: {e}") from None
            progress.note("converting outputs and writing manifest.json")
            try:
                artifacts, bundle = outputs.produce(profile, dib_base, result)
            except outputs.OutputError as e:
                raise BuildError(str(e)) from None
            meta = cached.meta
            manifest = {
                "profile": profile.to_dict(),
                "elements": [p.name for p in closure],
                "packages": outputs.read_dpkg_manifest(dib_base),
                "artifacts": artifacts,
                **({"pxe": bundle} if bundle else {}),
                "build": {
                    "started": started_at,
                    "duration_s": round(time.monotonic() - started, 1),
                    "diskimage_builder": version("diskimage-builder"),
                    "kpartx": meta.get("kpartx"),
                    "command": meta.get("command"),
                    "environment": meta.get("environment"),
                    "base": {
                        "key": key.digest,
                        "reused": reused,
                        "built": meta.get("stored"),
                        "dib_duration_s": meta.get("dib_duration_s"),
                        "layer": layered,
                        "late_files": [f.image_path for f in late_list],
                        "inputs": key.parts,
                    },
                },
                "input_hash": wanted.digest,
                "inputs": wanted.parts,
            }
            outputs.write_manifest(result, manifest)
            _replace_dir(result, final)
            (out_root / f"{profile.name}.failed.log").unlink(missing_ok=True)
            return BuildResult(final, False, manifest)
        finally:
            _remove_build_dir(tmp)


def base_key(profile: Profile, closure: list[Path], with_agent: bool, cmd: dib.DibCommand,
             build_dir: Path) -> tuple[inputs.Inputs, list[late.LateFile]]:
    """The key of the base this build starts from, and the late files it leaves out."""
    try:
        late_list = late.late_files(closure)
    except late.LateFilesError as e:
        raise BuildError(str(e)) from None
    key = inputs.base_hash(profile, closure, normalised_command(cmd, build_dir), with_agent,
                           frozenset(f.source for f in late_list))
    return key, late_list


def normalised_command(cmd: dib.DibCommand, build_dir: Path) -> dict[str, Any]:
    """DIB's argv and environment as the base key sees them: this build's temp dir and
    the checkout's location replaced by placeholders, the caller's PATH left out."""
    def norm(v: str) -> str:
        return v.replace(str(build_dir), "<build>").replace(str(repo_root()), "<repo>")
    return {"argv": [norm(a) for a in cmd.argv[1:]],
            "env": {k: norm(v) for k, v in sorted(cmd.env.items()) if k != "PATH"}}


def _build_base(profile: Profile, tmp: Path, cmd: dib.DibCommand, key: inputs.Inputs,
                agent_source: str | None, late_digest: str, progress: Progress) -> base.Base:
    """Run DIB for this build and keep what it wrote in the base cache."""
    wheels = render.build_wheelhouse(agent_source) if agent_source is not None else None
    if wheels is not None:
        progress.note(f"agent wheels: {len(list(wheels.glob('*.whl')))} from {wheels}")
    render.render_overlay(profile, tmp, wheels)  # -> tmp/elements, as dib_command expects
    log_path = tmp / "dib.log"
    try:  # once per build, before DIB's first kpartx
        kpartx = hostcompat.ensure_kpartx()
    except (OSError, RuntimeError) as e:
        raise BuildError(f"this host has no device-mapper and {e}") from None
    elements = " ".join(profile.build_elements)
    progress.note(f"disk-image-create: {elements} (kpartx: {kpartx})")
    began = time.monotonic()
    try:
        with progress:
            dib.run_dib(cmd, log_path, progress)
    except dib.DibFailed as e:
        kept = tmp.parent / f"{profile.name}.failed.log"
        shutil.copyfile(log_path, kept)
        raise BuildError(f"{e}; full log: {display(kept)}") from None
    try:
        return base.store(key.digest, tmp / "dib" / profile.name, log_path, {
            "profile": profile.name,
            "agent_source": agent_source,
            "late_files": late_digest,
            "dib_duration_s": round(time.monotonic() - began, 1),
            "kpartx": kpartx,
            "command": cmd.argv[1:],
            "environment": {k: v for k, v in cmd.env.items() if k.startswith("DIB_")},
            "inputs": key.parts,
        })
    except (base.BaseCacheError, OSError) as e:
        raise BuildError(f"base cache: {e}") from None


def _replace_dir(new: Path, final: Path) -> None:
    """Put new in final's place; the old directory is removed only after the swap."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{int(time.time())}")
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_build_dir(tmp: Path) -> None:
    """Remove a build's temp dir, never descending into something still mounted there
    (DIB bind-mounts /dev, /proc and caches into its chroot)."""
    dib.release_tmpdirs({str(p) for p in (tmp / "dibtmp").glob("dib_*")})
    if dib.mounts_under(str(tmp)):
        log.warning("%s: still has mounts; left in place", tmp)
        return
    dib.remove_tree(tmp)
