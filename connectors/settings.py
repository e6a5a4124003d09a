"""One way for every connector to read its settings from the engine's free-form config
(vLLM's ``kv_connector_extra_config``, SGLang's ``extra_config``): a frozen dataclass whose
fields are the keys, unknown keys refused with the list of known ones, ``check`` for the
rules a type cannot say."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Self

from cacheservice.errors import BadRequest


class ExtraSettings:
    """Mixin for a ``@dataclass(frozen=True)`` of settings."""

    SOURCE = "kv_connector_extra_config"

    @classmethod
    def from_extra(cls, extra: dict | None, ignore: Iterable[str] = ()) -> Self:
        extra = {k: v for k, v in (extra or {}).items() if k not in set(ignore)}
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(extra) - known)
        if unknown:
            raise BadRequest(f"unknown {cls.SOURCE} keys {unknown}: use only {sorted(known)}")
        settings = cls(**extra)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise BadRequest for a value out of range; the default accepts all."""
