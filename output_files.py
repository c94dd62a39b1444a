"""How every file of a run is written: aside under a name of its own, then renamed into place, so that a kill
never leaves a half-written file that a later run trusts; and scores as text that reads back exactly.
Standard library only: tools/make_demo.py writes the demo data without waiting for torch."""

import json
import os
import socket
from pathlib import Path


def aside(path):
    """A temporary name next to path, unique to this process: writers on several nodes never share a file."""
    path = Path(path)
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_text(path, text):
    tmp = aside(path)
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_with(path, write):
    """write(tmp_path) for any writer (a zip, an image, torch.save), then the rename."""
    tmp = aside(path)
    write(tmp)
    os.replace(tmp, path)


def format_score(score):
    """The shortest text that reads back as exactly the same float: files reproduce the reported metrics."""
    return repr(float(score))
