"""The errors a user can fix, and how every program reports them: one line, exit code 2, no traceback."""

import sys


class UserError(Exception):
    """A problem the user can fix (a path, a file, a setting). Programs print it as one line and exit 2."""


class StorageError(UserError):
    """A listed file that cannot be read (missing, no permission, a stale NFS handle, EIO): the storage is at
    fault, not the image, so the run stops instead of training on what remains."""

    def __init__(self, path, error):
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(
            f"cannot read {path} ({reason}); the split lists it, so check that --data_root is right "
            "and that its file system is mounted and readable"
        )


def run_cli(main):
    """Run a program's main(); user errors become one line on stderr and exit code 2, with no traceback."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
