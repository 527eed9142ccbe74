"""A job's compression settings: what the `[compression]` table and the instruction carry.

Kept apart from the encoders (`compression.py`, which need torch) so that reading a job
file, and the errors it may hold, costs no `import torch`. docs/PROTOCOL.md section 8.1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from .errors import ConfigError, ProtocolError, Reason

QUANTIZE = ("none", "int8", "float16", "bfloat16")




@dataclass(frozen=True)
class Encoding:
    """How the tensors of one direction travel.

    `topk`: send only this fraction of each tensor's entries, the largest in
    magnitude (at least one entry; None = every entry). `quantize`: how the values
    travel — "none" (float32), "int8" (symmetric codes with float32 scales),
    "float16" or "bfloat16". `block`: int8 only, elements per scale (0 = one scale
    per tensor). Whatever the settings, a tensor goes as `coo` exactly when that is
    smaller than dense, so zeros are never paid for."""

    topk: float | None = None
    quantize: str = "none"
    block: int = 0

    @property
    def lossy(self) -> bool:
        return self.topk is not None or self.quantize != "none"


@dataclass(frozen=True)
class Uplink(Encoding):
    """Slave → master. `error_feedback`: carry what compression dropped into the next
    update (default: on exactly when the encoding is lossy)."""

    error_feedback: bool = False


@dataclass(frozen=True)
class Downlink(Encoding):
    """Master → devices. `delta`: send model changes as deltas against what devices
    hold (off: a full model every version). A full model (keyframe) goes out at least
    every `keyframe_every` versions, and whenever a delta would leave the devices
    farther than `max_drift` from the master's model (relative L2, see `drift`)."""

    delta: bool = False
    keyframe_every: int = 10
    max_drift: float = 0.05


@dataclass(frozen=True)
class Constraints:
    """Local training shaped so deltas are small by construction (`delta` updates only;
    FedProx's `prox_mu` stays in the job's [train] table). See `slave.trainer`.

    `l1_mu`: L1 pull toward the received weights, applied as its proximal step
    (soft-threshold by lr·l1_mu after every SGD step), so unneeded changes are exactly
    zero. `change_budget`: fraction of each parameter tensor's entries allowed to
    differ from the received weights (0 = no budget), enforced after every step.
    `change_threshold`: after training, changes with |Δ| below it are dropped."""

    l1_mu: float = 0.0
    change_budget: float = 0.0
    change_threshold: float = 0.0

    def train_kwargs(self) -> dict[str, float]:
        """Keyword arguments for `slave.trainer.train_local`."""
        return asdict(self)


@dataclass(frozen=True)
class CompressionSettings:
    """A job's `[compression]` settings; travels in the instruction (`to_wire`)."""

    uplink: Uplink = field(default_factory=Uplink)
    downlink: Downlink = field(default_factory=Downlink)
    constraints: Constraints = field(default_factory=Constraints)

    def to_wire(self) -> dict[str, Any]:
        """A plain CBOR map for the instruction (PROTOCOL.md 8.1); `topk` absent = dense."""
        return {section: {k: v for k, v in asdict(getattr(self, section)).items() if v is not None}
                for section in _SECTIONS}

    @classmethod
    def from_wire(cls, data: Any) -> CompressionSettings:
        """Parse the instruction's map; unknown keys are ignored (newer masters may add
        some), bad values are `bad_body`."""
        try:
            return _parse(data, "compression", strict=False)
        except ConfigError as exc:
            raise ProtocolError(Reason.BAD_BODY, str(exc)) from None


_SECTIONS = {"uplink": Uplink, "downlink": Downlink, "constraints": Constraints}

PRESETS: dict[str, CompressionSettings] = {
    "none": CompressionSettings(),
    "int8": CompressionSettings(
        uplink=Uplink(quantize="int8", block=256, error_feedback=True),
        downlink=Downlink(delta=True, quantize="int8", block=256)),
    "topk": CompressionSettings(
        uplink=Uplink(topk=0.01, quantize="int8", block=256, error_feedback=True),
        downlink=Downlink(delta=True, topk=0.05, quantize="int8", block=256)),  # 5%: bench/compression.py
    # topk with a keyframe only every 100 versions: the fewest bytes per round. On the reference
    # workload keyframes were 2/3 of topk's downlink per round (bench/vs_flower.py, docs/BENCHMARKS.md).
    "lean": CompressionSettings(
        uplink=Uplink(topk=0.01, quantize="int8", block=256, error_feedback=True),
        downlink=Downlink(delta=True, topk=0.05, quantize="int8", block=256, keyframe_every=100)),
}


def preset(name: str) -> CompressionSettings:
    """Settings by name (`fedmq demo --compression NAME`): none, int8, topk, lean."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"compression preset {name!r}: expected one of {', '.join(PRESETS)}") from None


def parse_compression(table: Mapping[str, Any], path: str = "compression") -> CompressionSettings:
    """The `[compression]` table of a job file: an optional `preset`, then
    `[compression.uplink]`, `.downlink`, `.constraints` keys overriding it."""
    return _parse(table, path, strict=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


_RULES: dict[str, tuple[Any, str]] = {  # key -> (check, what it must be)
    "topk": (lambda v: _number(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    "quantize": (lambda v: v in QUANTIZE, f"one of {', '.join(QUANTIZE)}"),
    "block": (lambda v: type(v) is int and v >= 0, "an int >= 0"),
    "error_feedback": (lambda v: isinstance(v, bool), "true or false"),
    "delta": (lambda v: isinstance(v, bool), "true or false"),
    "keyframe_every": (lambda v: type(v) is int and v >= 1, "an int >= 1"),
    "max_drift": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "l1_mu": (lambda v: _number(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "change_budget": (lambda v: _number(v) and 0 <= v <= 1, "a fraction in [0, 1] (0 = no budget)"),
    "change_threshold": (lambda v: _number(v) and 0 <= v < math.inf, "a finite number >= 0"),
}
_FLOATS = {"topk", "max_drift", "l1_mu", "change_budget", "change_threshold"}


def _parse(table: Any, path: str, *, strict: bool) -> CompressionSettings:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{path}: expected a table")
    extra = sorted(set(table) - {"preset", *_SECTIONS}, key=str)
    if strict and extra:
        raise ConfigError(f"{path}.{extra[0]}: unknown key (allowed: preset, {', '.join(_SECTIONS)})")
    name = table.get("preset", "none")
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{path}.preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    settings = PRESETS[name]
    parts = {}
    for section, cls in _SECTIONS.items():
        sub = table.get(section, {})
        where = f"{path}.{section}"
        if not isinstance(sub, Mapping):
            raise ConfigError(f"{where}: expected a table")
        allowed = {f.name for f in cls.__dataclass_fields__.values()}
        unknown = sorted(set(sub) - allowed, key=str)
        if strict and unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
        given = {}
        for key in sorted(set(sub) & allowed):
            check, what = _RULES[key]
            if not check(sub[key]):
                raise ConfigError(f"{where}.{key}: expected {what}, got {sub[key]!r}")
            given[key] = float(sub[key]) if key in _FLOATS else sub[key]
        part = replace(getattr(settings, section), **given)
        if isinstance(part, Encoding):
            part = _settle_encoding(part, given, where)
        parts[section] = part
    return CompressionSettings(**parts)


def _settle_encoding(enc: Encoding, given: Mapping[str, Any], where: str) -> Encoding:
    """Apply the rules between keys: `block` belongs to int8; error feedback defaults
    to on exactly when the uplink is lossy."""
    if enc.quantize != "int8" and enc.block:
        if "block" in given:
            raise ConfigError(f"{where}.block: only applies to quantize = \"int8\" (got quantize = {enc.quantize!r})")
        enc = replace(enc, block=0)  # a preset's block, after quantize was overridden
    if isinstance(enc, Uplink) and "error_feedback" not in given and ("topk" in given or "quantize" in given):
        enc = replace(enc, error_feedback=enc.lossy)
    return enc
