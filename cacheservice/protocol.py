"""msgpack wire format (PROTOCOL.md): request decoding with precise errors, response encoding.

Shared by the server (``Fields`` validates what arrives) and the clients (``pack``,
``join_keys``, ``error_for``). Every check raises ``BadRequest`` naming the field and the fix,
before the service is called, so a bad request never changes stored state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any

import msgpack

from cacheservice import errors
from cacheservice.errors import BadRequest, CacheServiceError
from index.hashing import KEY_BYTES, ROOT_KEY, Namespace

CONTENT_TYPE = "application/msgpack"
_MISSING = object()
# Bounds applied while decoding, before any object is built past them: a request is one map
# of scalars and bins, with at most a nested namespace map and one or two arrays. Without
# them a body of empty maps costs 64x its size in Python objects.
MAX_CONTAINERS = 16
MAX_MAP_LEN = 32
MAX_STR_LEN = 4096


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=True)


def join_keys(keys: Iterable[bytes]) -> bytes:
    out = b"".join(keys)
    if len(out) % KEY_BYTES:
        raise BadRequest(f"every key must be {KEY_BYTES} bytes (index.hashing keys)")
    return out


def split_keys(blob: bytes) -> list[bytes]:
    return [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]


def error_body(code: str, message: str) -> bytes:
    return pack({"error": code, "message": message})


_ERRORS: dict[str, type[CacheServiceError]] = {
    cls.code: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, CacheServiceError)
}


def error_for(status: int, body: bytes) -> CacheServiceError:
    """The typed error a client raises for a non-2xx answer (5xx -> ServiceUnavailable)."""
    try:
        doc = unpack(body)
        code, message = str(doc["error"]), str(doc.get("message", ""))
    except Exception:
        code, message = "", body[:200].decode("utf-8", "replace")
    if status >= 500:
        return errors.ServiceUnavailable(f"service answered {status}: {message or code}")
    cls = _ERRORS.get(code)
    if cls is None or cls is errors.ServiceUnavailable:
        err = CacheServiceError(f"{status} {code}: {message}")
        err.status, err.code = status, code or "bad_request"
        return err
    return cls(message)


def unpack_request(body: bytes, max_keys: int) -> Any:
    """Decode a request body under the bounds above; raises BadRequest past them."""
    budget = [MAX_CONTAINERS]

    def count(container: Any) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise BadRequest(
                f"body nests more than {MAX_CONTAINERS} maps/arrays: a request is one map of "
                "fields (PROTOCOL.md)"
            )
        return container

    return msgpack.unpackb(
        body,
        raw=False,
        strict_map_key=True,
        max_array_len=max_keys,
        max_map_len=MAX_MAP_LEN,
        max_str_len=MAX_STR_LEN,
        max_ext_len=0,
        list_hook=count,
        object_hook=count,
    )


class Fields:
    """Typed, validated access to one decoded request map."""

    def __init__(self, body: bytes, max_keys: int):
        try:
            doc = unpack_request(body, max_keys) if body else {}
        except BadRequest:
            raise
        except Exception as e:
            raise BadRequest(
                f"body is not valid msgpack ({type(e).__name__}: {e}); send a msgpack map "
                f"with Content-Type {CONTENT_TYPE}"
            ) from None
        if not isinstance(doc, dict):
            raise BadRequest(f"body must be a msgpack map, got {type(doc).__name__}")
        self.doc: dict[str, Any] = doc
        self.max_keys = max_keys

    def _get(self, name: str, default: Any) -> Any:
        value = self.doc.get(name, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise BadRequest(f"missing field {name!r}")
            return default
        return value

    def _typed(self, name: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise BadRequest(f"field {name!r} must be {what}, got {type(value).__name__}")
        return value

    def string(self, name: str, default: Any = _MISSING) -> str:
        return self._typed(name, self._get(name, default), str, "a string")

    def opt_string(self, name: str) -> str | None:
        return None if self.doc.get(name) is None else self.string(name)

    def ns(self) -> str:
        ns = self.string("ns")
        if len(ns) != 16:
            raise BadRequest(
                f"field 'ns' must be the 16-hex-digit id from /v1/namespace, got {ns!r}"
            )
        return ns

    def integer(
        self, name: str, default: Any = _MISSING, lo: int | None = 0, hi: int | None = None
    ) -> int:
        value = self._typed(name, self._get(name, default), int, "an integer")
        if lo is not None and value < lo:
            raise BadRequest(f"field {name!r} must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise BadRequest(f"field {name!r} must be <= {hi}, got {value}")
        return value

    def opt_int(self, name: str, lo: int | None = 0, hi: int | None = None) -> int | None:
        return None if self.doc.get(name) is None else self.integer(name, lo=lo, hi=hi)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        return self._typed(name, self._get(name, default), bool, "a boolean")

    def blob(self, name: str, default: Any = _MISSING) -> bytes:
        return self._typed(name, self._get(name, default), bytes, "binary (msgpack bin)")

    def opt_bin(self, name: str) -> bytes | None:
        return None if self.doc.get(name) is None else self.blob(name)

    def key(self, name: str, default: Any = _MISSING) -> bytes:
        value = self.blob(name, default)
        if len(value) != KEY_BYTES:
            raise BadRequest(f"field {name!r} must be one {KEY_BYTES}-byte key, got {len(value)}")
        return value

    def parent(self) -> bytes:
        return self.key("parent", ROOT_KEY)

    def keys(self, name: str = "keys") -> bytes:
        """n keys as one bin of n*16 bytes; CacheService splits and validates them (length,
        count, repeats, the root), in one place for HTTP and in-process callers alike."""
        return self.blob(name)

    def key_list(self, name: str) -> list:
        """A msgpack array of single keys (``chunks`` in /v1/chunks/lookup), validated by
        CacheService like ``keys``."""
        return self._typed(name, self._get(name, _MISSING), list, "an array of 16-byte bins")

    def bool_list(self, name: str, length: int | None = None) -> list[bool] | None:
        value = self.doc.get(name)
        if value is None:
            return None
        self._typed(name, value, list, "an array of booleans")
        if not all(isinstance(v, bool) for v in value):
            raise BadRequest(f"field {name!r} must hold only booleans")
        if length is not None and len(value) != length:
            raise BadRequest(f"field {name!r} has {len(value)} entries, expected {length}")
        return value

    def checksum_list(self, name: str) -> list[int | None] | None:
        """An optional array of xxh3_64 checksums (unsigned 64-bit ints, or nil)."""
        value = self.doc.get(name)
        if value is None:
            return None
        self._typed(name, value, list, "an array of unsigned 64-bit integers")
        for i, v in enumerate(value):
            ok = v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64)
            if not ok:
                raise BadRequest(f"{name}[{i}] must be an xxh3_64 checksum (uint64) or nil")
        return value

    def namespace(self) -> Namespace:
        value = self._typed("namespace", self._get("namespace", _MISSING), dict, "a map")
        for f in fields(Namespace):
            if f.name in value:
                kind = int if f.type == "int" else str
                self._typed(f"namespace.{f.name}", value[f.name], kind, f"a {f.type}")
        try:
            return Namespace.from_dict(value)
        except TypeError as e:
            raise BadRequest(
                f"field 'namespace' must have model, dtype, layout, block_tokens and optional "
                f"tp_rank, tp_size, salt, format_version: {e}"
            ) from None
        except ValueError as e:
            raise BadRequest(f"field 'namespace' is invalid: {e}") from None
