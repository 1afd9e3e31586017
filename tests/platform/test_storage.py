"""Storage against a real SeaweedFS: round trips, conditional writes, multipart, pyarrow, clear errors,
and a server restart in the middle of a sequence of writes."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import threading
import time
import uuid

import pytest

from reflade.platform.config import StorageConfig
from reflade.platform.stack import SeaweedServer, find_free_base_port, generate_credentials
from reflade.platform.storage import (
    BucketMissing,
    ObjectNotFound,
    PreconditionFailed,
    Storage,
    StorageAuthError,
    StorageUnreachable,
)


@pytest.fixture
def key_prefix() -> str:
    return f"test-storage-{uuid.uuid4().hex[:10]}/"


def _closed_port() -> int:
    """A TCP port nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- round trips
def test_bytes_round_trip(storage, key_prefix):
    data = os.urandom(4096) + b"\x00end"
    etag = storage.put_bytes(key_prefix + "blob.bin", data)
    body, etag2 = storage.get_bytes(key_prefix + "blob.bin")
    assert body == data
    assert etag == etag2
    assert storage.exists(key_prefix + "blob.bin")
    assert not storage.exists(key_prefix + "nothing.bin")
    assert [o["Key"] for o in storage.list(key_prefix)] == [key_prefix + "blob.bin"]


def test_json_round_trip(storage, key_prefix):
    doc = {"a": 1, "b": [1, 2, {"c": "ü"}], "n": None, "f": 1.5}
    storage.put_json(key_prefix + "doc.json", doc)
    back, _ = storage.get_json(key_prefix + "doc.json")
    assert back == doc
    assert storage.head(key_prefix + "doc.json")["ContentType"] == "application/json"


def test_missing_object_raises_object_not_found(storage, key_prefix):
    with pytest.raises(ObjectNotFound) as e:
        storage.get_bytes(key_prefix + "absent")
    assert f"s3://{storage.bucket}/{key_prefix}absent" in str(e.value)


# ---------------------------------------------------------------------------------------------- conditional writes
def test_if_none_match_creates_once(storage, key_prefix):
    key = key_prefix + "once.json"
    storage.put_json(key, {"writer": 1}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        storage.put_json(key, {"writer": 2}, if_none_match=True)
    assert storage.get_json(key)[0] == {"writer": 1}


def test_if_match_compare_and_swap(storage, key_prefix):
    key = key_prefix + "cas.json"
    first = storage.put_json(key, {"v": 1})
    second = storage.put_json(key, {"v": 2}, if_match=first)
    assert second != first
    # `first` is stale now: the swap must lose and leave the object as it is.
    with pytest.raises(PreconditionFailed):
        storage.put_json(key, {"v": 3}, if_match=first)
    assert storage.get_json(key)[0] == {"v": 2}
    storage.put_json(key, {"v": 3}, if_match=second)
    assert storage.get_json(key)[0] == {"v": 3}


# ---------------------------------------------------------------------------------------------- large files
def test_multipart_round_trip(storage_config, key_prefix, tmp_path):
    cfg = dataclasses.replace(storage_config, multipart_threshold_mb=5, multipart_chunk_mb=5)
    st = Storage(cfg)
    src = tmp_path / "big.bin"
    size = 21 * 1024 * 1024 + 12345
    with open(src, "wb") as f:
        f.write(os.urandom(size))
    key = key_prefix + "big.bin"
    st.upload_file(src, key, progress=False)
    head = st.head(key)
    assert int(head["ContentLength"]) == size
    # A multipart upload's ETag is "<md5 of part md5s>-<number of parts>": proves it went up in parts.
    assert head["ETag"].strip('"').endswith("-5")
    dst = tmp_path / "back.bin"
    st.download_file(key, dst, progress=False)
    assert os.path.getsize(dst) == size
    assert _sha256_file(dst) == _sha256_file(src)


def test_pyarrow_fs_reads_boto3_object(storage, key_prefix):
    data = os.urandom(70_000)
    storage.put_bytes(key_prefix + "pa/obj.bin", data)
    fs = storage.fs
    with fs.open_input_stream(storage.path(key_prefix + "pa/obj.bin")) as f:
        assert f.read() == data
    info = fs.get_file_info(storage.path(key_prefix + "pa/obj.bin"))
    assert info.size == len(data)


# ---------------------------------------------------------------------------------------------- errors
def test_wrong_secret_is_auth_error_without_secrets(storage_config):
    wrong = "WRONG" + uuid.uuid4().hex + "secret"
    cfg = dataclasses.replace(storage_config, secret_access_key=wrong, max_attempts=1)
    st = Storage(cfg)
    with pytest.raises(StorageAuthError) as e:
        st.check()
    for text in (str(e.value), repr(e.value)):
        assert wrong not in text
        assert storage_config.secret_access_key not in text
    assert storage_config.endpoint in str(e.value)
    # A plain request with the wrong key is an auth error too, not a generic failure.
    with pytest.raises(StorageAuthError) as e2:
        st.get_bytes("anything")
    assert wrong not in str(e2.value) and wrong not in repr(e2.value)


def test_transfer_errors_are_storage_errors(storage_config, storage, key_prefix, tmp_path):
    """upload_file/download_file go through boto3's transfer manager, which wraps the client's error."""
    wrong = "WRONG" + uuid.uuid4().hex
    st = Storage(dataclasses.replace(storage_config, secret_access_key=wrong, max_attempts=1))
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    with pytest.raises(StorageAuthError) as e:
        st.upload_file(src, key_prefix + "f.bin", progress=False)
    assert wrong not in str(e.value) and storage_config.secret_access_key not in str(e.value)
    storage.upload_file(src, key_prefix + "f.bin", progress=False)
    with pytest.raises(StorageAuthError):
        st.download_file(key_prefix + "f.bin", tmp_path / "back.bin", progress=False)
    with pytest.raises(ObjectNotFound):
        storage.download_file(key_prefix + "absent.bin", tmp_path / "back.bin", progress=False)


def test_unreachable_endpoint(storage_config):
    port = _closed_port()
    cfg = dataclasses.replace(storage_config, endpoint=f"http://127.0.0.1:{port}", max_attempts=1)
    st = Storage(cfg)
    t0 = time.monotonic()
    with pytest.raises(StorageUnreachable) as e:
        st.check()
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert f"cannot reach object store at http://127.0.0.1:{port}" in msg
    assert "reflade up" in msg
    assert storage_config.secret_access_key not in msg and storage_config.secret_access_key not in repr(
        e.value
    )
    with pytest.raises(StorageUnreachable):
        st.put_bytes("k", b"x")


def test_missing_bucket(storage_config):
    cfg = dataclasses.replace(storage_config, bucket=f"no-such-bucket-{uuid.uuid4().hex[:8]}", max_attempts=1)
    st = Storage(cfg)
    with pytest.raises(BucketMissing) as e:
        st.check()
    assert cfg.bucket in str(e.value)
    assert storage_config.secret_access_key not in str(e.value)
    assert storage_config.secret_access_key not in repr(e.value)


def test_check_passes_on_good_config(storage):
    storage.check()  # raises on any problem


def test_config_and_storage_reprs_hide_secret(storage, storage_config):
    secret = storage_config.secret_access_key
    assert secret not in repr(storage_config)
    assert secret not in repr(storage._creds)
    assert secret not in str(storage._creds)


# ---------------------------------------------------------------------------------------------- restart
def test_writes_survive_a_server_restart(tmp_path):
    server = SeaweedServer(tmp_path / "data", generate_credentials(), s3_port=find_free_base_port())
    server.start(timeout=60)
    try:
        server.create_bucket("restart-test")
        cfg = StorageConfig(
            endpoint=server.endpoint,
            bucket="restart-test",
            access_key_id=server.credentials.access_key_id,
            secret_access_key=server.credentials.secret_access_key,
        )
        assert cfg.max_attempts == 10  # the default retries are what carries the writes over the restart
        st = Storage(cfg)
        n = 40
        bodies = {f"obj/{i:03d}": f"object {i} ".encode() * (i + 1) for i in range(n)}
        done: list[str] = []
        errors: list[BaseException] = []
        some_written, stopped = threading.Event(), threading.Event()

        def writer():
            try:
                for i, (key, body) in enumerate(bodies.items()):
                    if i == 5:
                        some_written.set()
                        stopped.wait(60)  # the next write meets a server that is down
                    st.put_bytes(key, body)
                    done.append(key)
            except BaseException as e:  # recorded, asserted below
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        assert some_written.wait(30)
        server.stop()
        assert not server.alive()
        stopped.set()
        time.sleep(0.5)  # writes fail (connection refused) and retry meanwhile
        written_while_down = len(done)
        server.start(timeout=60)
        t.join(timeout=120)
        assert not t.is_alive(), "writer hung"
        assert errors == [], f"writer raised: {errors!r}"
        assert written_while_down == 5, "a write succeeded while the server was down"
        assert done == list(bodies)
        for key, body in bodies.items():
            assert st.get_bytes(key)[0] == body, key
    finally:
        server.stop()
