"""One error tree for the whole engine.

Every error carries a stable machine ``code`` that goes on the wire unchanged.
Messages are for humans and never contain secrets, card numbers, names, scores
or templates: they may reach a relying party.

    EngineError                         internal
    ├── ProtocolError                   bad_request
    │   ├── FrameTooLarge               frame_too_large        (connection closed)
    │   ├── MalformedFrame              malformed_frame        (connection closed)
    │   ├── InvalidMessage              invalid_message        (ValueError)
    │   ├── UnknownMessage              unknown_message
    │   ├── TooManyInFlight             too_many_in_flight
    │   └── NotAuthenticated            not_authenticated
    ├── ConnectionLimit                 connection_limit       (connection closed)
    │   ├── TooManyConnections          too_many_connections
    │   ├── IdleTimeout                 idle_timeout
    │   ├── TooSlow                     too_slow               (below the minimum receive rate)
    │   └── FrameBudgetExhausted        frame_budget           (retry_after_ms)
    ├── AuthError                       auth_failed
    │   ├── BadSignature                bad_signature
    │   ├── UnknownRelyingParty         unknown_relying_party
    │   ├── RelyingPartyDisabled        relying_party_disabled
    │   ├── LevelNotAllowed             level_not_allowed
    │   └── UnknownAcceptancePoint      unknown_acceptance_point
    ├── SessionError                    session_error
    │   ├── UnknownSession              unknown_session
    │   ├── SessionExpired              session_expired
    │   ├── SessionUsed                 session_used           (replay)
    │   └── ResultPending               result_pending         (retry_after_ms)
    ├── CredentialError                 credential_error
    │   ├── UnknownCredential           unknown_credential
    │   ├── CredentialVoided            credential_voided
    │   ├── CredentialSuspended         credential_suspended
    │   ├── CredentialDeleted           credential_deleted     (old device after rebind)
    │   ├── WrongDeviceKey              wrong_device_key
    │   └── LevelTooLow                 level_too_low
    ├── CardError                       card_error
    │   ├── UnknownCard                 unknown_card
    │   ├── CardNotValid                card_not_valid
    │   └── CardLost                    card_lost
    ├── EnrollmentError                 enrollment_refused
    │   ├── CardPhotoMismatch           card_photo_mismatch
    │   ├── DuplicateIdentity           duplicate_identity
    │   └── VerificationFailed          verification_failed    (rebind/report check)
    ├── SampleError                     bad_sample             (ValueError)
    │   ├── UndecodableSample           undecodable_sample
    │   ├── SampleTooLarge              sample_too_large
    │   ├── NoFace                      no_face
    │   ├── MultipleFaces               multiple_faces
    │   ├── FaceTooSmall                face_too_small
    │   ├── NoSpeech                    no_speech
    │   └── TooLittleSpeech             too_little_speech
    ├── Overloaded                      overloaded             (retry_after_ms)
    ├── RateLimited                     rate_limited           (retry_after_ms)
    ├── Conflict                        conflict
    ├── DeadlineExceeded                deadline_exceeded
    ├── Unavailable                     unavailable            (retry_after_ms; PostgreSQL or Redis unreachable)
    ├── ModelError                      model_error
    │   ├── ModelMissing                model_missing
    │   └── ModelIntegrityError         model_integrity
    ├── StoreError                      store_error
    │   └── StoreUnavailable            unavailable            (also an Unavailable: the store's database)
    └── ConfigError                     config_error           (ValueError)
"""

from __future__ import annotations

__all__ = [
    "EngineError",
    "ProtocolError",
    "FrameTooLarge",
    "MalformedFrame",
    "InvalidMessage",
    "UnknownMessage",
    "TooManyInFlight",
    "NotAuthenticated",
    "ConnectionLimit",
    "TooManyConnections",
    "IdleTimeout",
    "TooSlow",
    "FrameBudgetExhausted",
    "AuthError",
    "BadSignature",
    "UnknownRelyingParty",
    "RelyingPartyDisabled",
    "LevelNotAllowed",
    "UnknownAcceptancePoint",
    "SessionError",
    "UnknownSession",
    "SessionExpired",
    "SessionUsed",
    "ResultPending",
    "CredentialError",
    "UnknownCredential",
    "CredentialVoided",
    "CredentialSuspended",
    "CredentialDeleted",
    "WrongDeviceKey",
    "LevelTooLow",
    "CardError",
    "UnknownCard",
    "CardNotValid",
    "CardLost",
    "EnrollmentError",
    "CardPhotoMismatch",
    "DuplicateIdentity",
    "VerificationFailed",
    "SampleError",
    "UndecodableSample",
    "SampleTooLarge",
    "NoFace",
    "MultipleFaces",
    "FaceTooSmall",
    "NoSpeech",
    "TooLittleSpeech",
    "Overloaded",
    "RateLimited",
    "Conflict",
    "DeadlineExceeded",
    "Unavailable",
    "ModelError",
    "ModelMissing",
    "ModelIntegrityError",
    "StoreError",
    "StoreUnavailable",
    "ConfigError",
    "ERRORS_BY_CODE",
    "error_from_code",
]


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "internal"
    #: Closing the connection after replying (broken framing).
    fatal = False

    def __init__(self, message: str = "", *, retry_after_ms: int | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.retry_after_ms = retry_after_ms


class ProtocolError(EngineError):
    """The request does not follow the protocol."""

    code = "bad_request"


class FrameTooLarge(ProtocolError):
    """The frame length exceeds the configured maximum."""

    code = "frame_too_large"
    fatal = True


class MalformedFrame(ProtocolError):
    """The frame is not valid MessagePack or is truncated."""

    code = "malformed_frame"
    fatal = True


class InvalidMessage(ProtocolError, ValueError):
    """A field is missing, of the wrong type, or out of its limits."""

    code = "invalid_message"


class UnknownMessage(ProtocolError):
    """The message type is not known."""

    code = "unknown_message"


class TooManyInFlight(ProtocolError):
    """Too many requests in flight on this connection."""

    code = "too_many_in_flight"


class NotAuthenticated(ProtocolError):
    """This request needs an authenticated relying-party stream."""

    code = "not_authenticated"


class ConnectionLimit(EngineError):
    """A connection limit was reached; the connection is closed after this error."""

    code = "connection_limit"
    fatal = True


class TooManyConnections(ConnectionLimit):
    """The engine has no room for another connection of this kind; retry later."""

    code = "too_many_connections"


class IdleTimeout(ConnectionLimit):
    """The connection sent nothing for too long and had no request in flight."""

    code = "idle_timeout"


class TooSlow(ConnectionLimit):
    """The frame arrived slower than the minimum receive rate."""

    code = "too_slow"


class FrameBudgetExhausted(ConnectionLimit):
    """The engine holds as many partly received frames as its memory budget allows; retry later."""

    code = "frame_budget"


class AuthError(EngineError):
    """Authentication failed."""

    code = "auth_failed"


class BadSignature(AuthError):
    """A signature did not verify."""

    code = "bad_signature"


class UnknownRelyingParty(AuthError):
    """The relying party is not registered."""

    code = "unknown_relying_party"


class RelyingPartyDisabled(AuthError):
    """The relying party has been disabled by the operator."""

    code = "relying_party_disabled"


class LevelNotAllowed(AuthError):
    """The relying party may not request this assurance level."""

    code = "level_not_allowed"


class UnknownAcceptancePoint(AuthError):
    """The acceptance point is not registered or is disabled."""

    code = "unknown_acceptance_point"


class SessionError(EngineError):
    """The verification session cannot be used."""

    code = "session_error"


class UnknownSession(SessionError):
    """No such session."""

    code = "unknown_session"


class SessionExpired(SessionError):
    """The session has expired."""

    code = "session_expired"


class SessionUsed(SessionError):
    """The session has already been used."""

    code = "session_used"


class ResultPending(SessionError):
    """The session has no result yet."""

    code = "result_pending"


class CredentialError(EngineError):
    """The credential cannot be used."""

    code = "credential_error"


class UnknownCredential(CredentialError):
    """No such credential."""

    code = "unknown_credential"


class CredentialVoided(CredentialError):
    """The credential was replaced by a newer enrollment."""

    code = "credential_voided"


class CredentialSuspended(CredentialError):
    """The credential is suspended (ID card reported lost)."""

    code = "credential_suspended"


class CredentialDeleted(CredentialError):
    """The credential was moved to another device; delete it from this one."""

    code = "credential_deleted"


class WrongDeviceKey(CredentialError):
    """The device key is not the one bound to the credential."""

    code = "wrong_device_key"


class LevelTooLow(CredentialError):
    """The credential's assurance level is below the session's."""

    code = "level_too_low"


class CardError(EngineError):
    """The ID card cannot be used."""

    code = "card_error"


class UnknownCard(CardError):
    """The ID card is not in the registry."""

    code = "unknown_card"


class CardNotValid(CardError):
    """The ID card is not valid (expired or revoked)."""

    code = "card_not_valid"


class CardLost(CardError):
    """The ID card has been reported lost."""

    code = "card_lost"


class EnrollmentError(EngineError):
    """The enrollment was refused."""

    code = "enrollment_refused"


class CardPhotoMismatch(EnrollmentError):
    """The live face does not match the ID card photo."""

    code = "card_photo_mismatch"


class DuplicateIdentity(EnrollmentError):
    """This face is already enrolled under another ID card."""

    code = "duplicate_identity"


class VerificationFailed(EnrollmentError):
    """The fresh face + voice check did not match the credential."""

    code = "verification_failed"


class SampleError(EngineError, ValueError):
    """A face image or voice recording is not usable."""

    code = "bad_sample"


class UndecodableSample(SampleError):
    """The sample could not be decoded as an image or audio file."""

    code = "undecodable_sample"


class SampleTooLarge(SampleError):
    """The sample exceeds the size limit."""

    code = "sample_too_large"


class NoFace(SampleError):
    """No face was found in the image."""

    code = "no_face"


class MultipleFaces(SampleError):
    """Several faces of similar size were found; none is clearly the subject."""

    code = "multiple_faces"


class FaceTooSmall(SampleError):
    """The face is too small for a reliable comparison."""

    code = "face_too_small"


class NoSpeech(SampleError):
    """No speech was found in the recording."""

    code = "no_speech"


class TooLittleSpeech(SampleError):
    """The recording holds too little speech for a reliable comparison."""

    code = "too_little_speech"


class Overloaded(EngineError):
    """The engine is at capacity; retry later."""

    code = "overloaded"


class RateLimited(EngineError):
    """The relying party's request quota is exhausted; retry later."""

    code = "rate_limited"


class Conflict(EngineError):
    """A concurrent change to the same credential won; retry from fresh state."""

    code = "conflict"


class DeadlineExceeded(EngineError):
    """The request did not finish within its deadline."""

    code = "deadline_exceeded"


class Unavailable(EngineError):
    """A service the engine depends on (PostgreSQL, Redis) cannot be reached right now; retry later."""

    code = "unavailable"


class ModelError(EngineError):
    """A model could not be loaded."""

    code = "model_error"


class ModelMissing(ModelError):
    """A model file or manifest is missing."""

    code = "model_missing"


class ModelIntegrityError(ModelError):
    """A model file does not match the digest in its manifest."""

    code = "model_integrity"


class StoreError(EngineError):
    """The durable store failed."""

    code = "store_error"


class StoreUnavailable(StoreError, Unavailable):
    """The database cannot be reached right now; retry later."""

    code = "unavailable"


class ConfigError(EngineError, ValueError):
    """The configuration is invalid."""

    code = "config_error"


def _walk(cls: type[EngineError]) -> list[type[EngineError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_walk(sub))
    return out


ERRORS_BY_CODE: dict[str, type[EngineError]] = {}
for _cls in _walk(EngineError):  # first in the tree wins: "unavailable" is Unavailable, not StoreUnavailable
    ERRORS_BY_CODE.setdefault(_cls.code, _cls)


def error_from_code(code: str, message: str = "", retry_after_ms: int | None = None) -> EngineError:
    """Rebuild the typed error for a code received on the wire (clients use this)."""
    cls = ERRORS_BY_CODE.get(code, EngineError)
    err = cls(message, retry_after_ms=retry_after_ms)
    if cls is EngineError and code != EngineError.code:
        err.code = code  # keep unknown codes from newer servers visible
    return err
