"""A job's differential-privacy settings: the `[privacy]` table, as the instruction carries it.

Kept apart from `privacy.py` (noise and the accountant, which need torch and the
optional dp-accounting) so that reading a job file costs no `import torch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError, ProtocolError, Reason
from .options import REQUIRED, Option, number, parse_table

_OPTIONS = {
    "clip_norm": Option(REQUIRED, number(0, open_low=True)),
    "noise_multiplier": Option(REQUIRED, number(0)),
    "delta": Option(1e-5, number(0, 1, open_low=True)),
}


@dataclass(frozen=True)
class DPSettings:
    """C (`clip_norm`), z (`noise_multiplier`) and the δ at which ε is reported."""

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5

    @classmethod
    def from_table(cls, table: Mapping[str, Any], path: str = "privacy") -> DPSettings:
        """From a job's `[privacy]` table; errors name the key (``privacy.clip_norm: ...``)."""
        return cls(**parse_table(table, _OPTIONS, path=path))

    def to_wire(self) -> dict[str, float]:
        """The map the master puts in the instruction (CBOR floats)."""
        return asdict(self)

    @classmethod
    def from_wire(cls, body: Any) -> DPSettings:
        """Settings from an instruction; a malformed map is a ProtocolError(BAD_BODY)."""
        if not isinstance(body, Mapping):
            raise ProtocolError(Reason.BAD_BODY, "privacy settings must be a map")
        try:
            return cls.from_table(body, path="instruction.privacy")
        except ConfigError as exc:
            raise ProtocolError(Reason.BAD_BODY, str(exc)) from exc

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to every coordinate: z·C."""
        return self.noise_multiplier * self.clip_norm
