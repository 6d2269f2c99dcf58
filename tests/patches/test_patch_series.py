"""tools/patches.py against synthetic repositories: every command, the happy paths and the refusals."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from .conftest import World, commit_all, git, tool

pytestmark = pytest.mark.patches


def head(world: World) -> str:
    return git(world.sub, "rev-parse", "HEAD")


def pin(world: World) -> str:
    return git(world.root, "ls-files", "--stage", "external/lib").split()[1]


def test_export_writes_zeroed_numberless_patches_with_why(patched: World) -> None:
    series = (patched.series_dir / "series").read_text().splitlines()
    assert series == ["# test series", "core-mark-f3.patch", "setup-declare-opencv.patch"]
    text = (patched.series_dir / "core-mark-f3.patch").read_text()
    assert text.startswith("From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n")
    assert "Subject: [PATCH] core: mark f3\n" in text
    assert "Origin: vendor" in text and "Forwarded: no" in text
    assert "-- \n" not in text, "no signature"
    assert " 1 file changed" not in text, "no diffstat"
    assert tool.lint_series(tool.Project(patched.root), "lib") == []


def test_apply_resets_to_pin_and_is_reproducible_and_idempotent(patched: World, capsys) -> None:
    assert patched.run("apply", "lib") == 0
    first = head(patched)
    assert git(patched.sub, "rev-parse", "HEAD~2") == pin(patched)
    assert "# patched" in (patched.sub / "lib/core.py").read_text()
    assert git(patched.sub, "log", "-1", "--format=%cn|%cd", "--date=unix") == (
        "model-quantization patch series|0"
    )
    stamp = json.loads((tool.git_dir(patched.sub) / tool.STAMP_FILE).read_text())
    assert stamp["pin"] == pin(patched) and stamp["head"] == first

    capsys.readouterr()
    assert patched.run("apply", "lib") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert head(patched) == first

    # A second clone of the superproject gets byte-identical commits: hashes are reproducible.
    clone = patched.root.parent / "clone"
    git(patched.root.parent, "clone", "--quiet", "--recurse-submodules", str(patched.root), str(clone))
    assert tool.main(["--root", str(clone), "apply", "lib"]) == 0
    assert git(clone / "external/lib", "rev-parse", "HEAD") == first


def test_export_is_byte_identical_when_nothing_changed(patched: World, capsys) -> None:
    patched.run("apply", "lib")
    before = patched.patch_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in patched.series_dir.iterdir()}
    capsys.readouterr()
    assert patched.run("export", "lib") == 0
    assert "byte-identical" in capsys.readouterr().out
    assert patched.patch_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in patched.series_dir.iterdir()} == mtimes
    assert git(patched.root, "status", "--porcelain", "patches") == ""


def test_check_passes_then_catches_tampering_and_lint_errors(patched: World, capsys) -> None:
    assert patched.run("check", "lib") == 0
    patch = patched.series_dir / "setup-declare-opencv.patch"
    original = patch.read_text()

    # A hand-edited patch (abbreviated blob ids) still applies, but it is not what the tool exports.
    patch.write_text(re.sub(r"^index (\w{7})\w+\.\.(\w{7})\w+", r"index \1..\2", original, flags=re.M))
    capsys.readouterr()
    assert patched.run("check", "lib") == 1
    assert "setup-declare-opencv.patch differs from a fresh export" in capsys.readouterr().out

    patch.write_text(original.replace("Forwarded: no\n", ""))
    assert patched.run("check", "lib") == 1
    assert "lacks the `Forwarded:` trailer" in capsys.readouterr().out

    patch.write_text(original)
    (patched.series_dir / "stray.patch").write_text(original)
    assert patched.run("check", "lib") == 1
    assert "stray.patch is not listed" in capsys.readouterr().out


def test_lint_requires_a_why(world: World) -> None:
    world.edit(world.sub, "lib/core.py", "return 1\n", "return -1\n")
    commit_all(world.sub, "core: negate f1\n\nOrigin: vendor\nForwarded: no\n")
    world.run("export", "lib")
    problems = tool.lint_series(tool.Project(world.root), "lib")
    assert any("has no body" in p for p in problems)


def test_apply_refuses_uncommitted_edits_and_loses_nothing(patched: World, capsys) -> None:
    patched.run("apply", "lib")
    patched_head = head(patched)
    (patched.series_dir / "series").write_text("core-mark-f3.patch\n")  # series changed -> apply must act
    (patched.series_dir / "setup-declare-opencv.patch").unlink()
    patched.edit(patched.sub, "lib/core.py", "return 7\n", "return 7  # my experiment\n")
    assert patched.run("apply", "lib") == 2
    err = capsys.readouterr().err
    assert "uncommitted changes" in err and "lib/core.py" in err and "--force" in err
    assert head(patched) == patched_head
    assert "# my experiment" in (patched.sub / "lib/core.py").read_text()

    assert patched.run("apply", "lib", "--force") == 0
    assert "git stash" in capsys.readouterr().out
    assert "# my experiment" not in (patched.sub / "lib/core.py").read_text()
    assert "# my experiment" in git(patched.sub, "stash", "show", "-p", "stash@{0}")


def test_apply_refuses_foreign_commits_and_force_keeps_a_backup(patched: World, capsys) -> None:
    patched.run("apply", "lib")
    patched.edit(patched.sub, "lib/core.py", "return 9\n", "return 99\n")
    mine = commit_all(patched.sub, "my local work")
    (patched.series_dir / "series").write_text("core-mark-f3.patch\n")
    (patched.series_dir / "setup-declare-opencv.patch").unlink()
    assert patched.run("apply", "lib") == 2
    assert "not the recorded series" in capsys.readouterr().err
    assert head(patched) == mine

    assert patched.run("apply", "lib", "--force") == 0
    assert git(patched.sub, "rev-parse", f"{tool.BACKUP_REF_PREFIX}{mine}") == mine


def test_failing_patch_is_named_and_submodule_left_clean_at_pin(patched: World, capsys) -> None:
    new_pin = patched.upstream_commit("lib/core.py", "return 3\n", "return 3.0\n")
    git(patched.sub, "fetch", "--quiet", "origin")
    git(patched.root, "update-index", "--cacheinfo", f"160000,{new_pin},external/lib")
    assert patched.run("apply", "lib") == 2
    err = capsys.readouterr().err
    assert "patches/lib/core-mark-f3.patch (#1 of 2) does not apply" in err
    assert "lib/core.py" in err and "refresh lib" in err
    assert head(patched) == new_pin
    assert git(patched.sub, "status", "--porcelain") == ""
    assert not (tool.git_dir(patched.sub) / "rebase-apply").exists()
    assert not (tool.git_dir(patched.sub) / tool.STAMP_FILE).exists()


def test_refresh_stops_at_conflict_and_continue_finishes(patched: World, capsys) -> None:
    new_pin = patched.upstream_commit("lib/core.py", "return 3\n", "return 3.0\n")
    git(patched.sub, "fetch", "--quiet", "origin")
    git(patched.root, "update-index", "--cacheinfo", f"160000,{new_pin},external/lib")
    git(patched.root, "commit", "--quiet", "-m", "move pin")
    assert patched.run("refresh", "lib") == 2
    err = capsys.readouterr().err
    assert "core-mark-f3.patch conflicts" in err and "conflicting files: lib/core.py" in err

    assert patched.run("refresh", "lib", "--continue") == 2
    assert "still unresolved: lib/core.py" in capsys.readouterr().err

    core = patched.sub / "lib/core.py"
    text = core.read_text()
    start, end = text.index("<<<<<<<"), text.index(">>>>>>>")
    end = text.index("\n", end) + 1
    core.write_text(text[:start] + "    return 3.0  # patched\n" + text[end:])
    git(patched.sub, "add", "lib/core.py")
    assert patched.run("refresh", "lib", "--continue") == 0
    assert "return 3.0  # patched" in (patched.series_dir / "core-mark-f3.patch").read_text()
    assert patched.run("check", "lib") == 0
    assert git(patched.sub, "rev-parse", "HEAD~2") == new_pin


def test_bump_drops_absorbed_patch_and_leaves_two_commits(patched: World, capsys) -> None:
    commits_before = int(git(patched.root, "rev-list", "--count", "HEAD"))
    # Upstream absorbs the setup.py patch verbatim and changes something unrelated.
    patched.upstream_commit(
        "setup.py", '"numpy",\n', '"numpy",\n    "opencv-python-headless",\n', "add opencv"
    )
    new = patched.upstream_commit("lib/core.py", "return 15\n", "return 15  # upstream\n")
    assert patched.run("bump", "lib", new) == 0
    out = capsys.readouterr().out
    assert "dropped setup-declare-opencv.patch" in out
    assert pin(patched) == new
    log = git(patched.root, "log", "--format=%s", f"-{2}").splitlines()
    assert log == ["patches/lib: refresh for " + new[:12], "external/lib: bump to " + new[:12]]
    assert int(git(patched.root, "rev-list", "--count", "HEAD")) == commits_before + 2
    assert (patched.series_dir / "series").read_text().splitlines()[-1] == "core-mark-f3.patch"
    assert not (patched.series_dir / "setup-declare-opencv.patch").exists()
    assert "Dropped (absorbed upstream): setup-declare-opencv.patch" in git(
        patched.root, "log", "-1", "--format=%b"
    )
    assert git(patched.root, "status", "--porcelain", "--ignore-submodules=all") == ""
    assert git(patched.root, "diff", "--cached", "--name-only") == ""
    assert patched.run("check", "lib") == 0
    assert patched.run("apply", "lib") == 0

    # A fresh clone of the bumped superproject builds the same patched tree.
    clone = patched.root.parent / "after-bump"
    git(patched.root.parent, "clone", "--quiet", "--recurse-submodules", str(patched.root), str(clone))
    assert tool.main(["--root", str(clone), "apply", "lib"]) == 0
    assert git(clone / "external/lib", "rev-parse", "HEAD") == head(patched)


def test_bump_with_conflict_resumes_with_continue(patched: World, capsys) -> None:
    new = patched.upstream_commit("lib/core.py", "return 3\n", "return 3.0\n")
    assert patched.run("bump", "lib", new) == 2
    assert "refresh lib --continue" in capsys.readouterr().err
    assert pin(patched) != new, "nothing is committed before the conflict is resolved"
    core = patched.sub / "lib/core.py"
    text = core.read_text()
    start, end = text.index("<<<<<<<"), text.index(">>>>>>>")
    core.write_text(text[:start] + "    return 3.0  # patched\n" + text[text.index("\n", end) + 1 :])
    git(patched.sub, "add", "lib/core.py")
    assert patched.run("bump", "lib", "--continue") == 0
    assert pin(patched) == new
    assert patched.run("check", "lib") == 0


def test_unknown_series_and_missing_submodule_are_clear_errors(world: World, capsys) -> None:
    assert world.run("apply", "detectron") == 2
    assert "unknown patch series 'detectron'; known: lib" in capsys.readouterr().err
    shutil.rmtree(world.sub)
    world.sub.mkdir()
    assert world.run("apply", "lib") == 2
    assert "git submodule update --init external/lib" in capsys.readouterr().err


def test_cli_runs_standalone(patched: World) -> None:
    proc = subprocess.run(
        ["python3", str(tool.__file__), "--root", str(patched.root), "check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "patches/lib: OK (2 patch(es)" in proc.stdout


def test_staging_the_patched_head_as_pin_is_caught(patched: World, capsys) -> None:
    upstream_pin = pin(patched)
    patched.run("apply", "lib")
    git(patched.root, "add", "--all")  # the classic mistake after a build
    assert pin(patched) == head(patched)
    assert patched.run("apply", "lib") == 2
    err = capsys.readouterr().err
    assert "a commit made by applying the patch series" in err and upstream_pin in err
    assert patched.run("check", "lib") == 1
    assert "exists only here" in capsys.readouterr().out
