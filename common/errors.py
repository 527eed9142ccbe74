"""The project's error types.

Every rejection of untrusted input raises `ProtocolError` with a machine-readable
`reason`, so a daemon can count and log rejections by reason with one `except`
clause, and never crashes on bad input. Mistakes in a user's own files (job
config, keys) raise `ConfigError`, which the CLI turns into a one-line message
and a non-zero exit.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Base class of all errors fedmq raises on purpose."""


class ProtocolError(FedmqError):
    """A message (or part of one) that came over the network was rejected.

    `reason` is a short stable identifier (see `Reason`); `detail` is for humans.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ConfigError(FedmqError):
    """A user-supplied file or option is wrong; the message says what to fix."""


class Reason:
    """The machine-readable rejection reasons carried by `ProtocolError.reason`."""

    MALFORMED = "malformed"                # not CBOR, or not the structure the spec requires
    BAD_SIGNATURE = "bad_signature"        # Ed25519 signature does not verify
    UNKNOWN_KID = "unknown_kid"            # key id not in the receiver's key ring
    UNSUPPORTED_ALG = "unsupported_alg"    # protected header alg is not EdDSA
    WRONG_TOPIC = "wrong_topic"            # signature is valid for another topic (external_aad)
    WRONG_JOB = "wrong_job"                # manifest names another job
    WRONG_SENDER = "wrong_sender"          # key of one participant used in another's name/topic
    REPLAY = "replay"                      # sequence number not above the last accepted
    SEQ_AHEAD = "seq_ahead"                # sequence number too far ahead of the receiver's clock
    DIGEST_MISMATCH = "digest_mismatch"    # body does not hash to the signed SHA-256
    SIZE_MISMATCH = "size_mismatch"        # body length differs from the signed size
    BAD_VERSION = "bad_version"            # unknown protocol version
    BAD_KIND = "bad_kind"                  # unknown or unexpected message kind
    BAD_TENSOR = "bad_tensor"              # tag/dtype/shape/byte-length inconsistent
    TOO_LARGE = "too_large"                # exceeds a configured element/byte/chunk limit
    NON_FINITE = "non_finite"              # NaN or Inf where finite values are required
    BAD_CHUNK = "bad_chunk"                # chunk index/count inconsistent
    CHUNK_TIMEOUT = "chunk_timeout"        # reassembly did not complete in time (reported by Inbox.expire)
    NOT_ENROLLED = "not_enrolled"          # valid signature, but the sender is not allowed
    BAD_BODY = "bad_body"                  # body does not match the message kind's schema
    FOREIGN_UPDATE = "foreign_update"      # update_id not SENDER/ROUND/VERSION of its signed sender, round, version
    STALE = "stale"                        # an update for a round or version that can no longer count
    UNCONFIRMED_PART = "unconfirmed_part"  # an update touching a model part its sender did not confirm
    NON_FINITE_AGGREGATE = "non_finite_aggregate"  # finite updates whose aggregate was not (the version is discarded)


MAX_DETAIL = 300  # characters of any text from a remote party that goes into a log line


def clip(text: str, limit: int = MAX_DETAIL) -> str:
    """`text` cut to `limit` characters: a log line must not grow with what a remote party sends."""
    return text if len(text) <= limit else text[:limit - 1] + "…"
