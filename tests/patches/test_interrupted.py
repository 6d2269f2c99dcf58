"""tools/patches.py after being killed mid-`apply`: nothing is lost, and the advice it prints works."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .conftest import World, commit_all, git, tool

pytestmark = pytest.mark.patches

ENTRIES = [
    "core-mark-f3.patch",
    "setup-declare-opencv.patch",
    "core-mark-f11.patch",
    "core-mark-f17.patch",
]


@pytest.fixture
def four(patched: World) -> World:
    """The `patched` world with two more patches: four in the series, committed in the superproject."""
    patched.add_patch("lib/core.py", "return 11\n", "return 11  # patched\n", "core: mark f11")
    patched.add_patch("lib/core.py", "return 17\n", "return 17  # patched\n", "core: mark f17")
    commit_all(patched.root, "four patches", paths=("patches",))
    assert (patched.series_dir / "series").read_text().splitlines()[1:] == ENTRIES
    return patched


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def kill_apply_at_patch(world: World, number: int, whole_group: bool) -> None:
    """Run `apply --force` in a subprocess and SIGKILL it while `git am` handles patch `number` of the series.

    A pre-applypatch hook (it runs after a patch is applied to the index, before the commit) holds git am at
    that patch. `whole_group` kills git am too, leaving its half-done state; otherwise only the tool dies
    (as with `kill -9 <pid>`), the orphaned git am commits that patch, and no further patch is applied.
    """
    hooks = tool.git_dir(world.sub) / "hooks"
    hooks.mkdir(exist_ok=True)
    count, ready, go = (world.root.parent / n for n in ("am-count", "am-ready", "am-go"))
    hook = hooks / "pre-applypatch"
    hook.write_text(
        "#!/bin/sh\n"
        f'n=$(( $(cat "{count}" 2>/dev/null || echo 0) + 1 )); echo $n > "{count}"\n'
        f'if [ $n = {number} ]; then touch "{ready}"; while [ ! -e "{go}" ]; do sleep 0.02; done; fi\n'
    )
    hook.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, str(tool.__file__), "--root", str(world.root), "apply", "lib", "--force"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(ready.exists, "git am to reach the patch")
    finally:
        if whole_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        go.touch()
        hook.unlink()
    rebase_apply = tool.git_dir(world.sub) / "rebase-apply"
    if not whole_group:
        wait_for(lambda: not rebase_apply.exists(), "the orphaned git am to finish")
    assert rebase_apply.exists() == whole_group


def commits_above_pin(world: World) -> int:
    pin = git(world.root, "ls-files", "--stage", "external/lib").split()[1]
    return int(git(world.sub, "rev-list", "--count", f"{pin}..HEAD"))


def test_killed_apply_refuses_with_working_advice_and_export_drops_nothing(four: World, capsys) -> None:
    before = four.patch_bytes()
    kill_apply_at_patch(four, 2, whole_group=False)
    assert commits_above_pin(four) == 2 and git(four.sub, "status", "--porcelain") == ""

    assert four.run("apply", "lib") == 2
    err = capsys.readouterr().err
    assert "2 of the 4 patches" in err and "nox -s patches -- apply lib --force" in err
    assert "export" not in err, "export from here would drop the two patches not yet applied"

    # What the old advice led to: export deleting the patches the submodule stopped short of.
    assert four.run("export", "lib") == 2
    err = capsys.readouterr().err
    assert "core-mark-f11.patch" in err and "core-mark-f17.patch" in err
    assert "nox -s patches -- apply lib --force" in err
    assert four.patch_bytes() == before

    assert four.run("apply", "lib", "--force") == 0
    assert commits_above_pin(four) == 4
    assert four.run("export", "lib") == 0
    assert four.patch_bytes() == before
    assert four.run("check", "lib") == 0


def test_export_keeps_the_series_when_work_sits_on_a_partial_apply(four: World, capsys) -> None:
    before = four.patch_bytes()
    kill_apply_at_patch(four, 2, whole_group=False)
    four.edit(four.sub, "lib/core.py", "return 5\n", "return 55\n")
    mine = commit_all(four.sub, "core: my change")

    assert four.run("export", "lib") == 2
    err = capsys.readouterr().err
    assert "core-mark-f11.patch" in err and "core-mark-f17.patch" in err
    assert "nox -s patches -- apply lib --force" in err
    cherry_pick = re.search(r"`(git -C external/lib cherry-pick \S+\.\.(\w+))`", err)
    assert cherry_pick and mine.startswith(cherry_pick.group(2))
    assert four.patch_bytes() == before

    # The printed recovery: apply the whole series (HEAD kept as a backup ref), cherry-pick, export.
    assert four.run("apply", "lib", "--force") == 0
    subprocess.run(cherry_pick.group(1).split(), cwd=four.root, check=True, capture_output=True)
    assert four.run("export", "lib") == 0
    after = four.patch_bytes()
    assert {k: v for k, v in after.items() if k != "series"} == {
        **{k: v for k, v in before.items() if k != "series"},
        "core-my-change.patch": after["core-my-change.patch"],
    }
    assert (four.series_dir / "series").read_text().splitlines()[1:] == [*ENTRIES, "core-my-change.patch"]


def test_killed_git_am_is_recovered_by_the_advice_it_prints(four: World, capsys) -> None:
    before = four.patch_bytes()
    kill_apply_at_patch(four, 2, whole_group=True)
    assert commits_above_pin(four) == 1
    assert git(four.sub, "status", "--porcelain", "--untracked-files=no") != "", "patch 2 is half applied"

    assert four.run("apply", "lib") == 2
    err = capsys.readouterr().err
    assert "nox -s patches -- apply lib --force" in err and "refresh lib --continue" not in err
    assert four.run("refresh", "lib", "--continue") == 2
    assert "nox -s patches -- apply lib --force" in capsys.readouterr().err

    assert four.run("apply", "lib", "--force") == 0
    assert not (tool.git_dir(four.sub) / "rebase-apply").exists()
    assert commits_above_pin(four) == 4 and git(four.sub, "status", "--porcelain") == ""
    assert "opencv" in git(four.sub, "stash", "show", "-p", "stash@{0}"), "the half-applied step is stashed"
    assert four.run("export", "lib") == 0
    assert four.patch_bytes() == before
    assert four.run("check", "lib") == 0


def test_a_users_own_rebase_is_not_sent_to_refresh(patched: World, capsys) -> None:
    patched.run("apply", "lib")
    env = {**os.environ, "GIT_SEQUENCE_EDITOR": "sed -i 1ibreak"}  # stop at once, mid-rebase
    subprocess.run(
        ["git", "rebase", "-i", "HEAD~1"], cwd=patched.sub, env=env, check=True, capture_output=True
    )
    assert (tool.git_dir(patched.sub) / "rebase-merge").exists()
    assert patched.run("apply", "lib", "--force") == 2
    err = capsys.readouterr().err
    assert "git -C external/lib rebase --continue" in err and "refresh" not in err
