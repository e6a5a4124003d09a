"""The shared secret between a service and its same-user clients.

Default posture: the service requires a bearer token even on loopback, because any local
user can reach 127.0.0.1. Without a configured token it uses the one in a token file
(``~/.config/cacheservice/token`` or ``$CACHESERVICE_TOKEN_FILE``), creating it at first start
with 256 random bits, mode 0600 in a 0700 directory. Clients and connectors of the same user
read the same file, so a one-command start still works; another user cannot read it and gets
401. ``--auth none`` opens the service deliberately.

Kept apart from ``auth.py`` (the server middleware) so clients import no server code.
"""

from __future__ import annotations

import os
import secrets

TOKEN_ENV = "CACHESERVICE_TOKEN"
TOKEN_FILE_ENV = "CACHESERVICE_TOKEN_FILE"
DEFAULT_TOKEN_FILE = "~/.config/cacheservice/token"


class TokenFileError(ValueError):
    """The token file cannot be created or is unsafe; the message says how to fix it."""


def token_file_path(path: str | None = None) -> str:
    return os.path.expanduser(path or os.environ.get(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE)


def read_token(path: str) -> str | None:
    """The token in ``path``, or None when the file is missing or unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


def load_or_create(path: str | None = None) -> str:
    """The service side: the token in the token file, created (atomically) when missing.
    Refuses a file other users can read: the token would be no secret."""
    path = token_file_path(path)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            try:
                os.link(tmp, path)  # fails if another service created it meanwhile: use theirs
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        mode = os.stat(path).st_mode
    except OSError as e:
        raise TokenFileError(
            f"cannot create the token file {path}: {e.strerror}; set --token-file to a "
            "writable path, or CACHESERVICE_TOKEN"
        ) from None
    if mode & 0o077:
        raise TokenFileError(
            f"token file {path} is readable by other users (mode {mode & 0o777:o}): "
            f"chmod 600 {path}"
        )
    token = read_token(path)
    if token is None:
        raise TokenFileError(f"token file {path} is empty or unreadable: delete it to renew")
    return token


def client_token(explicit: str | None = None) -> str | None:
    """The client side: an explicit token, else $CACHESERVICE_TOKEN, else the token file if
    this user can read it (None: send no token)."""
    if explicit:
        return explicit
    return os.environ.get(TOKEN_ENV) or read_token(token_file_path())
