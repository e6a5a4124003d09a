"""Typed user errors. Each maps to one HTTP status and says how to fix the request."""

from __future__ import annotations


class CacheServiceError(Exception):
    status = 400
    code = "bad_request"


class BadRequest(CacheServiceError):
    """Malformed body, missing or mistyped field."""


class UnknownNamespace(CacheServiceError):
    status = 404
    code = "unknown_namespace"


class NamespaceConflict(CacheServiceError):
    status = 409
    code = "namespace_conflict"


class WrongBlockSize(CacheServiceError):
    status = 422
    code = "wrong_block_size"


class TooLarge(CacheServiceError):
    status = 413
    code = "too_large"


class Unauthorized(CacheServiceError):
    status = 401
    code = "unauthorized"


class ServiceUnavailable(CacheServiceError):
    """Raised by the client when the service cannot be reached or timed out."""

    status = 503
    code = "unavailable"


class Overloaded(CacheServiceError):
    """Too many open leases (or slots held by them): release leases, or retry later."""

    status = 429
    code = "overloaded"


class Forbidden(CacheServiceError):
    """A request from a web page (Origin header) or for an unexpected Host name."""

    status = 403
    code = "forbidden"


class UnsupportedMediaType(CacheServiceError):
    status = 415
    code = "unsupported_media_type"
