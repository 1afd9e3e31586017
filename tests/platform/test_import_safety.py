"""What leaves this machine: `registry import` never follows a symbolic link (a link to a credentials file must
not be uploaded), and the wheel `jobs submit` ships comes from a cache that only this user can write."""

from __future__ import annotations

import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from reflade.platform import jobs
from reflade.platform.jobs import JobError, build_wheel, private_dir, wheel_cache_dir
from reflade.platform.registry import RegistryError

SECRET = b"[default]\naws_secret_access_key = do-not-upload-me\n"


@pytest.fixture
def secret_file(tmp_path) -> Path:
    p = tmp_path / "outside" / "credentials"
    p.parent.mkdir()
    p.write_bytes(SECRET)
    return p


def test_links_inside_a_folder_are_skipped_and_reported(registry, tmp_path, secret_file):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"weights")
    (folder / "sub" / "config.json").write_text("{}")
    (folder / "creds").symlink_to(secret_file)
    (folder / "sub" / "outside-dir").symlink_to(secret_file.parent, target_is_directory=True)
    (folder / "dangling").symlink_to(tmp_path / "nothing-here")

    v = registry.create("weights", "linked", folder, progress=False)
    assert {f["path"] for f in v.files} == {"model.bin", "sub/config.json"}
    assert v.skipped_links == ["creds", "dangling", "sub/outside-dir"]
    dest = tmp_path / "down"
    registry.download(v.ref, dest)
    for p in dest.rglob("*"):
        assert not p.is_file() or SECRET not in p.read_bytes()


def test_a_link_as_the_source_or_in_a_mapping_is_refused(registry, tmp_path, secret_file):
    link = tmp_path / "creds-link"
    link.symlink_to(secret_file)
    with pytest.raises(RegistryError, match="is a symbolic link"):
        registry.create("weights", "linked-file", link, progress=False)
    dir_link = tmp_path / "dir-link"
    dir_link.symlink_to(secret_file.parent, target_is_directory=True)
    with pytest.raises(RegistryError, match="is a symbolic link"):
        registry.create("weights", "linked-dir", dir_link, progress=False)
    with pytest.raises(RegistryError, match="is a symbolic link"):
        registry.create("weights", "linked-map", files={"credentials": link}, progress=False)
    only_links = tmp_path / "only-links"
    only_links.mkdir()
    (only_links / "creds").symlink_to(secret_file)
    with pytest.raises(RegistryError, match=r"holds no files \(1 symbolic links skipped: creds\)"):
        registry.create("weights", "only-links", only_links, progress=False)


# ---------------------------------------------------------------------------------------------- wheel cache
def _fake_pip_wheel(root: Path, build_dir: str) -> None:
    """Stands in for `pip wheel` (20 s here): a wheel-shaped zip is all the cache logic looks at."""
    with zipfile.ZipFile(Path(build_dir) / "reflade-0.1.0-py3-none-any.whl", "w") as z:
        z.writestr("reflade/marker.txt", "built")


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(jobs, "_pip_wheel", _fake_pip_wheel)
    return tmp_path / "xdg" / "reflade" / "wheels"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_wheel_cache_is_per_user_and_private(cache_home):
    assert wheel_cache_dir() == cache_home
    wheel = build_wheel(strip_requirements=False)
    assert wheel.is_relative_to(cache_home)
    assert _mode(cache_home) == 0o700 and _mode(wheel.parent) == 0o700
    assert _mode(wheel) == 0o600
    assert build_wheel(strip_requirements=False) == wheel  # cached
    assert not any(p.name.startswith(".build-") for p in cache_home.iterdir())


def test_a_writable_cache_is_emptied_and_rebuilt(cache_home):
    first = build_wheel(strip_requirements=False)
    # Someone else could have planted a wheel: the cache and the digest folder were left world-writable.
    planted = first.parent / "reflade-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(planted, "w") as z:
        z.writestr("reflade/evil.py", "import os")
    os.chmod(cache_home, 0o777)
    wheel = build_wheel(strip_requirements=False)
    assert not planted.exists()
    assert _mode(cache_home) == 0o700
    assert zipfile.ZipFile(wheel).namelist() == ["reflade/marker.txt"]


def test_a_writable_wheel_is_not_reused(cache_home):
    first = build_wheel(strip_requirements=False)
    with zipfile.ZipFile(first, "w") as z:
        z.writestr("reflade/evil.py", "import os")
    os.chmod(first, 0o666)
    wheel = build_wheel(strip_requirements=False)
    assert zipfile.ZipFile(wheel).namelist() == ["reflade/marker.txt"]
    assert _mode(wheel) == 0o600


def test_a_readable_cache_is_tightened(cache_home):
    build_wheel(strip_requirements=False)
    os.chmod(cache_home, 0o755)
    build_wheel(strip_requirements=False)
    assert _mode(cache_home) == 0o700


def test_a_cache_of_another_user_or_a_link_is_refused(cache_home, tmp_path, monkeypatch):
    private_dir(cache_home)
    real_uid = os.getuid()
    monkeypatch.setattr(jobs.os, "getuid", lambda: real_uid + 1)
    with pytest.raises(JobError, match=rf"belongs to uid {real_uid}, not to you"):
        build_wheel(strip_requirements=False)
    monkeypatch.setattr(jobs.os, "getuid", lambda: real_uid)
    cache_home.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    cache_home.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(JobError, match="is not a directory"):
        build_wheel(strip_requirements=False)


@pytest.mark.skipif(sys.platform != "linux", reason="mode bits")
def test_private_dir_creates_0700(tmp_path):
    d = private_dir(tmp_path / "a" / "b")
    assert _mode(d) == 0o700
