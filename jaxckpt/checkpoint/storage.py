"""What a checkpoint, run or weights location may be: the one place that decides.

Today: a local path, made absolute and normalised (tensorstore refuses a path holding `..` with
"Invalid file path", after a whole run has trained). A URL (`gs://`, `s3://`, `http://`, ...) is
refused: `pathlib` would silently turn it into a local folder named `gs:`. Object storage, when it
comes, is allowed here and nowhere else.
"""

from __future__ import annotations

import os
import pathlib
import re

from jaxckpt.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(path: os.PathLike | str, *, key: str | None = None) -> pathlib.Path:
    """`path` as an absolute, normalised local path (`~` expanded, `.` and `..` resolved textually).

    Args:
      path: a local path.
      key: the config key or argument it came from (e.g. "checkpoint.pretrained"), for the error.

    Raises:
      UserError: if `path` is a URL (object storage is not supported yet).
    """
    text = os.fspath(path)
    if _URL.match(text):
        where = f"{key}={text}" if key else text
        raise UserError(
            f"{where} is a URL; jaxckpt reads and writes local paths only for now (object storage such as "
            "gs:// or s3:// is not supported yet). Copy the files to a local disk (e.g. with gsutil or "
            "aws s3 cp) and pass that path.")
    return pathlib.Path(os.path.normpath(os.path.abspath(os.path.expanduser(text))))


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: os.PathLike | str) -> None:
    """Gives a file or directory made by `tempfile` (0600 / 0700) the mode `open`/`mkdir` would give it.

    That is 0666 / 0777 less the umask (usually 0644 / 0755), so a file renamed into place from a
    private temporary name is as readable as one written directly.
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())
