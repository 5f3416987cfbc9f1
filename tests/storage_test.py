"""jaxckpt.checkpoint.storage and orbax_s3: paths, kvstore specs, small files and Orbax on gs:// and s3://.

The emulators come from tests/object_store.py (registered in conftest.py).
"""

import base64
import json
import os
import stat
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.metadata import sharding as ocp_sharding
from orbax.checkpoint._src.serialization import tensorstore_utils

import jaxckpt
from experiments.configs import digits
from jaxckpt.checkpoint import orbax_s3, state_item, storage
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.errors import UserError
from jaxckpt.weights import zoo
from jaxckpt.weights.pretrained import resolve_checkpoint_path


@pytest.fixture(params=["gcs_emulator", "s3_emulator"])
def store_url(request):
    """A fresh directory URL on each store, per test (not `node.name`: fsspec globs its brackets)."""
    return f"{request.getfixturevalue(request.param)}/storage/{request.node.originalname}"


def _tree():
    return {"params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(3, jnp.bfloat16)},
            "step": jnp.asarray(7, jnp.int32)}


# Paths.

def test_is_url_and_split_url():
    assert storage.is_url("gs://b/x") and storage.is_url(epath.Path("s3://b/x"))
    assert not storage.is_url("runs/gs://x") and not storage.is_url("/tmp/a")
    assert storage.split_url("gs://bucket") == ("gs", "bucket", "")
    assert storage.split_url("s3://bucket//runs/./a/../b/") == ("s3", "bucket", "runs/b")


@pytest.mark.parametrize("url, culprit", [
    ("az://bucket/x", "not a gs:// or s3:// URL"),
    ("gs:///x", "names no bucket"),
    ("s3://bucket/a/../../x", "climbs above its bucket"),
    ("gs://bucket/run[1]", "glob patterns"),
])
def test_bad_urls_are_refused_with_the_reason(url, culprit):
    with pytest.raises(UserError, match=culprit) as refused:
        storage.as_path(url)
    assert url in str(refused.value)


def test_as_path_keeps_urls_and_normalises_local_paths(tmp_path, monkeypatch):
    assert str(storage.as_path("gs://bucket/runs//a/../b/")) == "gs://bucket/runs/b"
    assert str(storage.as_path("s3://bucket/runs/b") / "checkpoints") == "s3://bucket/runs/b/checkpoints"
    monkeypatch.chdir(tmp_path)
    assert str(storage.as_path("runs/a/../b")) == str(tmp_path / "runs" / "b")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert str(storage.as_path("~/x/..")) == str(tmp_path)


def test_kvstore_specs(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    local = {"driver": "file", "path": f"{tmp_path}/item/"}
    assert storage.kvstore_spec(tmp_path / "a" / ".." / "item") == local
    assert storage.kvstore_spec(tmp_path, single_writer=True)["file_io_locking"] == {"mode": "non_atomic"}
    assert storage.kvstore_spec("gs://bucket/run/3/state", single_writer=True) == {
        "driver": "gcs", "bucket": "bucket", "path": "run/3/state/"}
    assert storage.kvstore_spec("s3://bucket/run") == {
        "driver": "s3", "bucket": "bucket", "path": "run/", "aws_region": "eu-west-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert storage.kvstore_spec("s3://bucket")["endpoint"] == "http://127.0.0.1:9000"
    for spec in (storage.kvstore_spec("s3://bucket/x"), storage.kvstore_spec("gs://bucket/x")):
        ts.KvStore.Spec(spec)  # tensorstore accepts it as is


def test_atomicity_options():
    commit_file = ocp.options.AtomicityMode.COMMIT_FILE
    assert storage.atomicity_options("s3://bucket/c").mode == commit_file
    assert storage.atomicity_options("gs://bucket/c").mode == commit_file
    assert storage.atomicity_options("/tmp/c").mode == ocp.options.AtomicityMode.AUTO


# Small files.

def test_write_bytes_atomic_and_append_line_locally(tmp_path):
    path = tmp_path / "new" / "config.json"
    storage.write_bytes_atomic(path, b"{}")
    storage.write_bytes_atomic(path, b'{"a": 1}')
    assert path.read_bytes() == b'{"a": 1}'
    assert os.listdir(path.parent) == ["config.json"], "no temporary file may be left"
    metrics = tmp_path / "metrics.jsonl"
    storage.append_line(metrics, '{"step": 1}')
    storage.append_line(metrics, '{"step": 2}\n')
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_write_bytes_atomic_and_append_line_on_object_stores(store_url):
    config = f"{store_url}/config.json"
    storage.write_bytes_atomic(config, b"{}")
    storage.write_bytes_atomic(config, b'{"a": 1}')
    assert storage.as_path(config).read_bytes() == b'{"a": 1}'
    assert [p.name for p in storage.as_path(store_url).iterdir()] == ["config.json"]

    metrics = f"{store_url}/metrics.jsonl"
    storage.write_bytes_atomic(metrics, b'{"step": 0}')  # a file left without its final newline
    count = 100
    start = time.perf_counter()
    for step in range(1, count + 1):
        storage.append_line(metrics, json.dumps({"step": step, "split": "train", "loss": 1.0 / step}))
    per_append = (time.perf_counter() - start) / count
    lines = storage.as_path(metrics).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(count + 1))
    print(f"append_line on {store_url.split(':')[0]}: {per_append * 1e3:.1f} ms per append "
          f"at {len(lines)} lines")
    assert per_append < 2.0


# A state item in jaxckpt's layout (state_item.write's), written through kvstore_spec.

def _write_item(item_dir: str, tree) -> None:
    """What `state_item.write` does once its `item_kvstore_spec` and `_write_json` take URLs."""
    host = state_item.to_host(tree, copy=False)
    spec = {"driver": "ocdbt", "base": storage.kvstore_spec(item_dir, single_writer=True),
            "config": state_item._OCDBT_CONFIG}
    kvstore = ts.KvStore.open(spec, context=ts.Context()).result()
    txn = ts.Transaction(atomic=False)
    in_txn = kvstore.with_transaction(txn)
    tree_metadata, shardings = {}, {}
    for keys, (leaf, sharding) in host.items():
        name = ".".join(keys)
        serialized = ocp_sharding.from_jax_sharding(sharding).to_serialized_string()
        shardings[base64.urlsafe_b64encode(name.encode()).decode()] = serialized
        tree_metadata[str(keys)] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                                    "value_metadata": state_item._value_metadata(leaf, sharding)}
        leaf = np.require(leaf, requirements="C")
        in_txn.write(f"{name}/.zarray", json.dumps(state_item._zarray(leaf))).result()
        in_txn.write(state_item.chunk_key(name, leaf.ndim), leaf.tobytes()).result()
    txn.commit_async().result()
    storage.write_bytes_atomic(f"{item_dir}/_sharding", json.dumps(shardings).encode())
    storage.write_bytes_atomic(f"{item_dir}/_METADATA", json.dumps({
        "tree_metadata": tree_metadata, "use_ocdbt": True, "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True, "custom_metadata": {}}).encode())


def test_state_item_through_kvstore_spec_reads_back_with_tensorstore_and_plain_orbax(store_url):
    tree = _tree()
    item = f"{store_url}/checkpoints/7/state"
    _write_item(item, tree)

    base = {"driver": "ocdbt", "base": storage.kvstore_spec(item)}
    array = ts.open({"driver": "zarr", "kvstore": {**base, "path": "params.w/"}, "open": True}).result()
    read = array.read().result()
    np.testing.assert_array_equal(read, np.asarray(tree["params"]["w"]))

    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    with orbax_s3.orbax_s3():  # a no-op wrapper for gs://
        restored = ocp.PyTreeCheckpointHandler().restore(epath.Path(item),
                                                         args=ocp.args.PyTreeRestore(target))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Orbax on s3:// through orbax_s3().

@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_orbax_checkpoint_manager_on_s3(s3_emulator, use_ocdbt, tmp_path, monkeypatch):
    import boto3

    monkeypatch.chdir(tmp_path)  # where Orbax without the wrapper would put "s3:" folders
    directory = storage.as_path(f"{s3_emulator}/manager_ocdbt_{use_ocdbt}")
    tree = _tree()

    def handler():
        return ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)

    atomicity = storage.atomicity_options(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, atomicity_options=atomicity)
    with orbax_s3.orbax_s3():
        assert orbax_s3.installed()
        with ocp.CheckpointManager(directory, item_handlers=handler(), options=options) as mngr:
            for step in range(3):
                mngr.save(step, args=ocp.args.PyTreeSave(jax.tree.map(lambda x, step=step: x + step, tree)))
            mngr.wait_until_finished()
        with ocp.CheckpointManager(directory, item_handlers=handler()) as mngr:
            assert mngr.all_steps() == [1, 2]
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
            restored = mngr.restore(2, args=ocp.args.PyTreeRestore(target))
    assert not orbax_s3.installed(), "Orbax must be restored when the last user leaves"
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b) + 2)

    _, bucket, prefix = storage.split_url(directory)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    names = [item["Key"] for item in listing.get("Contents", [])]
    assert f"{prefix}/2/commit_success.txt" in names, names
    assert any(name.endswith("/2/default/manifest.ocdbt" if use_ocdbt else "/2/default/params.w/.zarray")
               for name in names), names
    assert list(tmp_path.iterdir()) == [], "nothing may be written to local disk"


def test_readers_on_s3_need_commit_file_to_skip_an_unfinished_step(s3_emulator):
    """A step without its commit marker (a save killed half-way) counts as a step unless told COMMIT_FILE."""
    import boto3

    directory = storage.as_path(f"{s3_emulator}/unfinished")
    options = ocp.CheckpointManagerOptions(atomicity_options=storage.atomicity_options(directory))
    with orbax_s3.orbax_s3(), ocp.CheckpointManager(directory, options=options) as mngr:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.StandardSave({"x": np.arange(3)}))
        mngr.wait_until_finished()
    _, bucket, prefix = storage.split_url(directory)
    boto3.client("s3").delete_object(Bucket=bucket, Key=f"{prefix}/2/commit_success.txt")

    with ocp.CheckpointManager(directory, options=options) as mngr:
        assert mngr.all_steps() == [1] and mngr.latest_step() == 1
    # Orbax's default for s3:// (not gs://) is rename-based: any step without a tmp suffix is done.
    with ocp.CheckpointManager(directory) as mngr:
        assert mngr.all_steps() == [1, 2]


def test_orbax_s3_changes_only_s3_specs(tmp_path):
    stock = tensorstore_utils.build_kvstore_tspec
    cases = [(str(d), ocdbt) for d in (tmp_path, "gs://bucket/c") for ocdbt in (True, False)]
    expected = [stock(d, "x", use_ocdbt=ocdbt) for d, ocdbt in cases]
    with orbax_s3.orbax_s3(), orbax_s3.orbax_s3():  # re-entrant
        built = tensorstore_utils.build_kvstore_tspec
        assert [built(d, "x", use_ocdbt=ocdbt) for d, ocdbt in cases] == expected
        s3 = built("s3://bucket/run//checkpoints/3/state/", use_ocdbt=True)
        assert s3["base"]["driver"] == "s3" and s3["base"]["bucket"] == "bucket"
        assert s3["base"]["path"] == "run/checkpoints/3/state"
    assert tensorstore_utils.build_kvstore_tspec is stock


def test_orbax_s3_refuses_an_untested_orbax(monkeypatch):
    monkeypatch.setattr(ocp, "__version__", "0.99.0")
    refused = pytest.raises(UserError, match=r"0\.99\.0 is installed.*orbax-checkpoint==0\.12\.8")
    with refused, orbax_s3.orbax_s3():
        pass
    assert not orbax_s3.installed()
    with orbax_s3.orbax_s3(allow_untested=True):
        assert orbax_s3.installed()


def test_orbax_s3_installs_nothing_when_orbax_handles_s3(monkeypatch):
    def native(directory, name=None, **kwargs):
        return {"driver": "s3", "bucket": "b", "path": ""}

    monkeypatch.setattr(tensorstore_utils, "build_kvstore_tspec", native)
    with orbax_s3.orbax_s3():
        assert tensorstore_utils.build_kvstore_tspec is native


# Local paths and file modes (issue 11).

def test_dotdot_is_resolved_everywhere(tmp_path):
    # tensorstore refuses a path holding '..' ("Invalid file path"), after a whole run trained.
    (tmp_path / "a").mkdir()
    dotted = tmp_path / "a" / ".." / "checkpoints"
    assert storage.local_path(dotted) == tmp_path / "checkpoints"
    with CheckpointManager(dotted) as manager:
        assert manager.directory == tmp_path / "checkpoints"
        manager.save(1, {"w": jnp.ones(3)})
    assert resolve_checkpoint_path(tmp_path / "a" / ".." / "checkpoints" / "1") == (tmp_path / "checkpoints", 1)
    assert zoo.resolve(str(dotted)) == tmp_path / "checkpoints"


@pytest.mark.parametrize("url", ["https://example.com/run", "file:///tmp/x", "gs:///no-bucket"])
def test_a_url_other_than_a_bucket_path_is_refused_before_anything_is_created(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^'.*' (is not a gs:// or s3:// URL|names no bucket)"):
        CheckpointManager(url)
    with pytest.raises(UserError, match=r"^workdir=.*(is not a gs:// or s3:// URL|names no bucket)"):
        jaxckpt.run(digits.get_config(), url)
    with pytest.raises(UserError):
        resolve_checkpoint_path(url)
    assert os.listdir(tmp_path) == []  # no folder named "https:" or "file:"


@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://bucket/run"])
def test_local_path_refuses_bucket_urls_where_only_a_local_path_will_do(url):
    with pytest.raises(UserError, match=r"zoo=.*is a URL; .*local paths only"):
        storage.local_path(url, key="zoo")
    assert str(storage.run_path(url)) == url


def test_give_default_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        (tmp_path / "f").write_text("x")
        os.chmod(tmp_path / "f", 0o600)
        storage.give_default_mode(tmp_path / "f")
        (tmp_path / "d").mkdir(mode=0o700)
        storage.give_default_mode(tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
