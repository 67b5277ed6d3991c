"""Rendering element templates into the per-build overlay element, and the input hash."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from builder import build, render
from builder.profile import load

PROFILE = """\
name: web
elements: [debian-minimal, vm, hvagent]
agent: {listen: /run/x/x.sock}
users:
  - name: admin
    ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAbc admin@example"]
"""


@pytest.fixture()
def web(fake_root: Path, add_element: Callable[..., Path]) -> Path:
    add_element("hvagent", {
        "templates/etc/hvagent/hvagent.yaml.j2":
            "# for {{ profile.name }}\nlisten: {{ profile.agent.listen }}\n",
        "templates/usr/local/bin/hello.j2": "#!/bin/sh\necho {{ profile.name }}\n",
    }, deps=("helper",))
    add_element("helper", {
        "templates/etc/corehost/users.j2":
            "{% for u in profile.users %}{{ u.name }} {{ u.ssh_keys | length }}\n{% endfor %}",
    })
    (fake_root / "elements/hvagent/templates/usr/local/bin/hello.j2").chmod(0o755)
    path = fake_root / "profiles" / "web.yaml"
    path.write_text(PROFILE)
    return path


def test_renders_templates_of_elements_and_their_deps(web: Path, tmp_path: Path) -> None:
    before = sorted(p.relative_to(web.parent.parent) for p in (web.parent.parent / "elements")
                    .rglob("*"))
    build = tmp_path / "build"
    build.mkdir()
    elements_root = render.render_overlay(load(web), build, None)
    overlay = elements_root / render.OVERLAY
    assert (overlay / "element-deps").read_text().split() == ["install-static"]
    static = overlay / "static"
    assert (static / "etc/hvagent/hvagent.yaml").read_text() == (
        "# for web\nlisten: /run/x/x.sock\n")
    assert (static / "etc/corehost/users").read_text() == "admin 1\n"  # from the dep element
    hello = static / "usr/local/bin/hello"
    assert hello.read_text() == "#!/bin/sh\necho web\n"
    assert hello.stat().st_mode & stat.S_IXUSR  # executable bit carried over
    assert not (static / "opt/hvagent/wheels").exists()  # no wheels asked for
    # the source elements are never written
    after = sorted(p.relative_to(web.parent.parent) for p in (web.parent.parent / "elements")
                   .rglob("*"))
    assert before == after


def test_wheels_land_in_the_overlay(web: Path, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "corehost-0.1.0-py3-none-any.whl").write_bytes(b"PK fake wheel")
    build = tmp_path / "build"
    build.mkdir()
    static = render.render_overlay(load(web), build, wheels) / render.OVERLAY / "static"
    assert [p.name for p in (static / render.WHEELS_IN_IMAGE).iterdir()] == [
        "corehost-0.1.0-py3-none-any.whl"]


def test_undefined_variable_names_the_template(web: Path, fake_root: Path,
                                               tmp_path: Path) -> None:
    tpl = fake_root / "elements/helper/templates/etc/motd.j2"
    tpl.write_text("hello {{ profile.no_such_setting }}\n")
    with pytest.raises(render.RenderError, match=r"elements/helper/templates/etc/motd.j2: .*"
                       r"no_such_setting"):
        render.render_overlay(load(web), tmp_path, None)


def test_syntax_error_names_template_and_line(web: Path, fake_root: Path, tmp_path: Path) -> None:
    tpl = fake_root / "elements/helper/templates/etc/motd.j2"
    tpl.write_text("ok\n{% if %}\n")
    with pytest.raises(render.RenderError, match=r"elements/helper/templates/etc/motd.j2:2: "):
        render.render_overlay(load(web), tmp_path, None)


def test_two_elements_rendering_one_path_is_an_error(web: Path, fake_root: Path,
                                                    tmp_path: Path) -> None:
    (fake_root / "elements/helper/templates/etc/hvagent").mkdir()
    (fake_root / "elements/helper/templates/etc/hvagent/hvagent.yaml.j2").write_text("x\n")
    with pytest.raises(render.RenderError, match="/etc/hvagent/hvagent.yaml is also rendered by"):
        render.render_overlay(load(web), tmp_path, None)


def test_closure_follows_element_deps_and_dib_defaults(web: Path) -> None:
    names = [p.name for p in render.element_closure(load(web).elements)]
    assert {"hvagent", "helper", "debian-minimal", "vm", "block-device-mbr", "base"} <= set(names)


def test_unknown_element_is_an_error(fake_root: Path) -> None:
    with pytest.raises(render.RenderError, match="Element 'nope' not found"):
        render.element_closure(["debian-minimal", "nope"])


def _digest(profile_path: Path) -> str:
    return build.plan(load(profile_path))[2].digest


def test_input_hash_changes_with_each_input(web: Path, fake_root: Path) -> None:
    first = _digest(web)
    assert _digest(web) == first  # stable

    tpl = fake_root / "elements/helper/templates/etc/corehost/users.j2"
    old = tpl.read_text()
    tpl.write_text(old + "# changed\n")
    changed_template = _digest(web)
    assert changed_template != first
    tpl.write_text(old)
    assert _digest(web) == first

    (fake_root / "elements/helper/install.d").mkdir()
    (fake_root / "elements/helper/install.d/10-x").write_text("#!/bin/bash\n")
    with_script = _digest(web)
    assert with_script not in (first, changed_template)

    (fake_root / "hvagent" / "__init__.py").write_text('"""agent v2"""\n')
    with_agent = _digest(web)
    assert with_agent != with_script

    web.write_text(web.read_text() + "kernel_cmdline: quiet\n")
    assert _digest(web) != with_agent


def test_agent_source_is_an_input_only_of_images_with_the_agent(web: Path,
                                                               fake_root: Path) -> None:
    bare = fake_root / "profiles" / "bare.yaml"
    bare.write_text("name: bare\nelements: [debian-minimal, vm]\n")
    with_agent, without = _digest(web), _digest(bare)
    (fake_root / "hvagent" / "api.py").write_text("ROUTES = []\n")
    assert _digest(web) != with_agent
    assert _digest(bare) == without
