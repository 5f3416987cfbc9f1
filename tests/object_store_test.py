"""Files and Orbax checkpoints on `gs://` and `s3://`, against local emulators (tests/object_store.py)."""

import json
import os
import urllib.error
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import object_store
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

COMMIT_FILE = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


@pytest.fixture(params=["gcs_emulator", "s3_emulator"])
def store_url(request):
    """A fresh directory URL on each store, per test."""
    # Not `request.node.name`: fsspec takes its brackets for a glob.
    return f"{request.getfixturevalue(request.param)}/{request.node.originalname}"


def _tree():
    return {"w": jnp.arange(12.0).reshape(3, 4), "b": {"count": jnp.arange(3, dtype=jnp.int32)}}


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save(directory: epath.Path, tree, *, use_ocdbt: bool, steps: int, **options) -> ocp.CheckpointManager:
    """Saves `tree` at steps 0..steps-1, keeping two; returns the (closed) manager."""
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)
    manager_options = ocp.CheckpointManagerOptions(max_to_keep=2, **options)
    with ocp.CheckpointManager(directory, item_handlers=handler, options=manager_options) as mngr:
        for step in range(steps):
            mngr.save(step, args=ocp.args.PyTreeSave(tree))
        mngr.wait_until_finished()
    return mngr


def _save_and_restore(directory: epath.Path, *, use_ocdbt: bool, steps: int = 2, **options):
    tree = _tree()
    _save(directory, tree, use_ocdbt=use_ocdbt, steps=steps, **options)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)
    with ocp.CheckpointManager(directory, item_handlers=handler) as mngr:
        assert mngr.all_steps() == list(range(max(steps - 2, 0), steps))
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        restored = mngr.restore(steps - 1, args=ocp.args.PyTreeRestore(target))
    _assert_same(restored, tree)


def _gcs_objects(prefix: str) -> list[str]:
    """Names under `gs://bucket/prefix`, listed through the JSON API (no client cache)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    url = f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{object_store.BUCKET}/o?{query}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return [item["name"] for item in json.load(response).get("items", [])]


def _gcs_create_only(name: str, data: bytes) -> int:
    """Uploads `data` unless the object exists (ifGenerationMatch=0); returns the HTTP status."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": name, "ifGenerationMatch": 0})
    url = f"{os.environ['STORAGE_EMULATOR_HOST']}/upload/storage/v1/b/{object_store.BUCKET}/o?{query}"
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _key(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


# Plain files through etils.epath (gcsfs for gs://, s3fs for s3://, since TensorFlow is absent).

def test_epath_write_read_list_rename_copy_delete(store_url):
    root = epath.Path(store_url)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "a.txt").write_text("hello")
    (root / "b.bin").write_bytes(b"\x00\x01")
    assert (root / "sub" / "a.txt").read_text() == "hello"
    assert sorted(p.name for p in root.iterdir()) == ["b.bin", "sub"]
    assert (root / "sub").is_dir() and not (root / "b.bin").is_dir()

    (root / "sub" / "a.txt").rename(root / "sub" / "renamed.txt")
    (root / "b.bin").copy(root / "c.bin")
    assert not (root / "sub" / "a.txt").exists()
    assert (root / "sub" / "renamed.txt").read_text() == "hello"
    assert (root / "c.bin").read_bytes() == b"\x00\x01"

    (root / "b.bin").unlink()
    assert sorted(p.name for p in root.iterdir()) == ["c.bin", "sub"]
    root.rmtree()
    assert not root.exists()


# Orbax on gs:// works as is.

@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_orbax_roundtrip_on_gcs(gcs_emulator, use_ocdbt):
    url = f"{gcs_emulator}/orbax_ocdbt_{use_ocdbt}"
    _save_and_restore(epath.Path(url), use_ocdbt=use_ocdbt, steps=3)
    names = _gcs_objects(_key(url)[1] + "/")
    assert any(name.endswith("/2/default/commit_success.txt") for name in names)
    assert not any("/0/" in name for name in names), "max_to_keep=2 should have deleted step 0"
    arrays = "/2/default/manifest.ocdbt" if use_ocdbt else "/2/default/w/.zarray"
    assert any(name.endswith(arrays) for name in names), names


def test_orbax_saves_on_gcs_repeatedly(gcs_emulator):
    """Each save writes OCDBT manifests with generation preconditions; none may fail."""
    tree = _tree()
    for i in range(10):
        directory = epath.Path(f"{gcs_emulator}/repeated/{i}")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(directory, tree)
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
        _assert_same(restored, tree)


def _write_twice_to_ocdbt(prefix: str):
    """Writes one key, then another through a fresh context, which reads the manifest back first."""
    spec = {"driver": "ocdbt", "base": {"driver": "gcs", "bucket": object_store.BUCKET, "path": prefix}}
    for key in ("first", "second"):
        kvstore = ts.KvStore.open(spec, context=ts.Context()).result()
        kvstore.write(key, b"value").result()
    return sorted(kvstore.list().result())


def test_ocdbt_rewrite_on_gcs_needs_the_generation_of_each_read(gcs_emulator, monkeypatch):
    assert _write_twice_to_ocdbt(f"{_key(gcs_emulator)[1]}/ocdbt/") == [b"first", b"second"]

    process, endpoint = object_store.start_gcs_emulator(patched=False)
    try:
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", endpoint)
        with pytest.raises(ValueError, match="Malformed StorageGeneration"):
            _write_twice_to_ocdbt("ocdbt/")
    finally:
        object_store.stop_emulator(process)


def test_tensorstore_gcs_key_ranges_and_conditional_delete(gcs_emulator):
    kvstore = ts.KvStore.open({"driver": "gcs", "bucket": object_store.BUCKET,
                               "path": f"{_key(gcs_emulator)[1]}/ranges/"}).result()
    for key in ("a", "b1", "b2", "c"):
        kvstore.write(key, key.encode()).result()
    assert sorted(kvstore.list(ts.KvStore.KeyRange("b", "c")).result()) == [b"b1", b"b2"]
    kvstore.delete_range(ts.KvStore.KeyRange("b", "c")).result()
    assert sorted(kvstore.list().result()) == [b"a", b"c"]

    stale = kvstore.read("a").result().stamp.generation
    kvstore.write("a", b"a2").result()
    assert kvstore.write("a", None, if_equal=stale).result().generation == b"", "stale delete must not apply"
    assert kvstore.read("a").result().value == b"a2"


# Orbax on s3:// needs a kvstore spec for tensorstore's s3 driver and commit-file atomicity.

def test_orbax_alone_cannot_write_arrays_to_s3(s3_emulator, tmp_path, monkeypatch):
    # Orbax hands tensorstore `{"driver": "file", "path": "s3:/bucket/..."}`: relative to the cwd.
    monkeypatch.chdir(tmp_path)
    local = tmp_path.joinpath("s3:", *_key(s3_emulator))
    with pytest.raises(ValueError, match="Checkpoint path should be absolute"):
        _save(epath.Path(f"{s3_emulator}/alone_ocdbt"), _tree(), use_ocdbt=True, steps=1,
              atomicity_options=COMMIT_FILE)
    assert (local / "alone_ocdbt" / "0" / "default" / "_sharding").exists()

    # Without OCDBT the save "works", but the arrays land on local disk.
    _save(epath.Path(f"{s3_emulator}/alone_zarr"), _tree(), use_ocdbt=False, steps=1,
          atomicity_options=COMMIT_FILE)
    assert (local / "alone_zarr" / "0" / "default" / "w" / ".zarray").exists()


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_orbax_roundtrip_on_s3(s3_emulator, use_ocdbt, tmp_path, monkeypatch):
    import boto3

    from jaxckpt.checkpoint.orbax_s3 import orbax_s3

    monkeypatch.chdir(tmp_path)
    url = f"{s3_emulator}/orbax_ocdbt_{use_ocdbt}"
    with orbax_s3():
        _save_and_restore(epath.Path(url), use_ocdbt=use_ocdbt, steps=3, atomicity_options=COMMIT_FILE)

    bucket, prefix = _key(url)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    names = [item["Key"] for item in listing.get("Contents", [])]
    arrays = "/2/default/manifest.ocdbt" if use_ocdbt else "/2/default/w/.zarray"
    assert any(name.endswith(arrays) for name in names), names
    assert not any("/0/" in name for name in names), "max_to_keep=2 should have deleted step 0"
    assert list(tmp_path.iterdir()) == [], "nothing may be written to local disk"


# Create-only writes, the building block of a lock object.

def test_gcs_create_only_refuses_a_second_create(gcs_emulator):
    name = f"{_key(gcs_emulator)[1]}/lock"
    assert _gcs_create_only(name, b"owner-1") == 200
    assert _gcs_create_only(name, b"owner-2") == 412
    assert epath.Path(f"gs://{object_store.BUCKET}/{name}").read_bytes() == b"owner-1"


def test_s3_create_only_refuses_a_second_create(s3_emulator):
    import boto3
    import botocore.exceptions

    bucket, prefix = _key(s3_emulator)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/lock", Body=b"owner-1", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/lock", Body=b"owner-2", IfNoneMatch="*")
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}/lock")["Body"].read() == b"owner-1"
