"""Runs gcp-storage-emulator with the GCS semantics that tensorstore and a lock object rely on.

The stock emulator (gcp-storage-emulator 2026.7.19) ignores the generation preconditions
`ifGenerationMatch` and `ifGenerationNotMatch`, omits `x-goog-generation` on media reads and
ignores `startOffset` and `endOffset` when listing. tensorstore's `gcs` driver takes the generation
of every read from that header (a missing one reads as generation 0, and the next conditional
request on it fails with "Malformed StorageGeneration"), makes every OCDBT write conditional, and
lists key ranges with offsets. This module wraps the emulator's handlers to behave like GCS does,
as tensorstore's own GCS mock (`tensorstore/kvstore/gcs_http/gcs_mock.cc`) does, adds
`objects.move` (gcsfs' rename), then serves in memory.

The emulator serves one request at a time, so a precondition check and the write it guards cannot
interleave with another request. Resumable uploads are checked when they are started.

    python tests/gcs_emulator_patched.py --port 9023 --bucket test-bucket
    python tests/gcs_emulator_patched.py --unpatched ...  # the stock emulator, for comparison
"""

import argparse
import functools
import json
import logging
from http import HTTPStatus
from http import server as http_server

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects

# tensorstore issues dozens of requests at once; the stdlib default backlog of 5 drops SYNs.
_LISTEN_BACKLOG = 128


def _query_int(request, name):
    values = request.query.get(name)
    return int(values[0]) if values else None


def _live_generation(storage, bucket, name):
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return None


def _upload_name(request):
    """The object name of a JSON-API upload: query `name`, else the metadata body's `name`."""
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or data).get("name")
    return None


def _failed_precondition(request, generation, *, reading):
    """Returns the status GCS answers when a generation precondition fails, else None."""
    if_match = _query_int(request, "ifGenerationMatch")
    if_not_match = _query_int(request, "ifGenerationNotMatch")
    if if_match is not None and if_match != (generation or 0):
        return HTTPStatus.PRECONDITION_FAILED
    if if_not_match is not None and generation is not None and if_not_match == generation:
        return HTTPStatus.NOT_MODIFIED if reading else HTTPStatus.PRECONDITION_FAILED
    return None


def _refuse(response, status):
    response.status = status
    if status == HTTPStatus.PRECONDITION_FAILED:
        response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                 "specified did not hold.", "errors": [{"reason": "conditionNotMet"}]}})


def _guard(handler, *, reading, name_of):
    """Wraps an object handler so it first checks the request's generation preconditions."""

    @functools.wraps(handler)
    def guarded(request, response, storage, *args, **kwargs):
        name = name_of(request)
        if name is not None:
            generation = _live_generation(storage, request.params["bucket_name"], name)
            status = _failed_precondition(request, generation, reading=reading)
            if status is not None:
                return _refuse(response, status)
        return handler(request, response, storage, *args, **kwargs)

    return guarded


def _with_generation_headers(download):
    @functools.wraps(download)
    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
            response["x-goog-stored-content-length"] = str(obj["size"])

    return download_with_generation


def _with_offsets(ls):
    """Applies `startOffset` (inclusive) and `endOffset` (exclusive) to a listing."""

    @functools.wraps(ls)
    def ls_with_offsets(request, response, storage, *args, **kwargs):
        ls(request, response, storage, *args, **kwargs)
        start = (request.query.get("startOffset") or [""])[0]
        end = (request.query.get("endOffset") or [None])[0]
        if response.status != HTTPStatus.OK or not (start or end):
            return
        listing = json.loads(response._content)
        in_range = lambda name: start <= name and (end is None or name < end)  # noqa: E731
        listing["items"] = [item for item in listing["items"] if in_range(item["name"])]
        listing["prefixes"] = [prefix for prefix in listing["prefixes"] if in_range(prefix)]
        response.json(listing)

    return ls_with_offsets


def _move(request, response, storage, *args, **kwargs):
    """`objects.move` (which gcsfs tries before copy+delete, retrying a 501 for ~30 s)."""
    bucket, source, destination = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, destination)
        storage.delete_file(bucket, source)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(moved)


def patch_emulator():
    """Rewires the emulator's routes (and the module globals they call) to the wrapped handlers."""
    object_name = lambda request: request.params["object_id"]  # noqa: E731
    get, download, insert = objects.get, objects.download, objects.insert
    download_with_generation = _with_generation_headers(download)
    replacements = {
        get: _guard(get, reading=True, name_of=object_name),
        download: _guard(download_with_generation, reading=True, name_of=object_name),
        insert: _guard(insert, reading=False, name_of=_upload_name),
        objects.delete: _guard(objects.delete, reading=False, name_of=object_name),
        objects.patch: _guard(objects.patch, reading=False, name_of=object_name),
        objects.ls: _with_offsets(objects.ls),
    }
    for _, methods in emulator_server.HANDLERS:
        for method, handler in methods.items():
            methods[method] = replacements.get(handler, handler)
    # Before the generic object route, which would take `a/moveTo/o/b` for an object name.
    move_route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
                  r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {"POST": _move})
    emulator_server.HANDLERS = (move_route, *emulator_server.HANDLERS)
    # `objects.get` calls the module-level `download` for `alt=media` (already guarded by then),
    # and the router falls back to the module-level `insert` for uploads posted without `/upload`.
    objects.download = download_with_generation
    objects.insert = replacements[insert]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--unpatched", action="store_true", help="serve the stock emulator")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    http_server.HTTPServer.request_queue_size = _LISTEN_BACKLOG
    if not args.unpatched:
        patch_emulator()
    emulator = emulator_server.create_server(args.host, args.port, in_memory=True)
    for bucket in args.bucket:
        buckets.create_bucket(bucket, emulator._storage)
    emulator.run()


if __name__ == "__main__":
    main()
