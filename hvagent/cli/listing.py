"""How a guest file is listed by both CLIs (`hvdisk ls -l`, `hvctl disk ls -l`): the
standard library only, so neither pays for the other's imports."""

from __future__ import annotations

import stat as st


def ls_line(e: dict[str, object]) -> str:
    """One `ls -l` line of a guest file entry (type, mode, uid, gid, size, name)."""
    kind = {"dir": st.S_IFDIR, "file": st.S_IFREG, "symlink": st.S_IFLNK}.get(
        str(e["type"]), 0)
    mode = st.filemode(kind | int(str(e["mode"]), 8))
    return f"{mode} {e['uid']:>5} {e['gid']:>5} {e['size']:>10} {e['name']}"
