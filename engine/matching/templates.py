"""Templates at rest: sealing and opening them with the operator's template key.

Each ciphertext is bound to its owner (``face:<card>``, ``voice:<card>``, ``card:<card>``)
as associated data, so a template copied to another card does not open. A face template
is the float32 vector; a voice template carries its band (:mod:`engine.inference.speaker`).
"""

from __future__ import annotations

import numpy as np

from ..crypto import TemplateCipher
from engine.inference.speaker import SpeakerEmbedding, pack_template, unpack_template

__all__ = ["TemplateSealer"]


class TemplateSealer:
    """Seals and opens the templates of one engine (its :class:`TemplateCipher`)."""

    def __init__(self, cipher: TemplateCipher) -> None:
        self.cipher = cipher

    def seal_face(self, vector: np.ndarray, card_number: str) -> bytes:
        return self.cipher.encrypt(np.asarray(vector, dtype=np.float32).tobytes(), f"face:{card_number}")

    def open_face(self, ciphertext: bytes, card_number: str) -> np.ndarray:
        return np.frombuffer(self.cipher.decrypt(ciphertext, f"face:{card_number}"), dtype=np.float32)

    def open_card(self, ciphertext: bytes, card_number: str) -> np.ndarray:
        """The embedding of the card's photo (sealed by :func:`engine.ops.registry.seal_card_template`)."""
        return np.frombuffer(self.cipher.decrypt(ciphertext, f"card:{card_number}"), dtype=np.float32)

    def seal_voice(self, embedding: SpeakerEmbedding, card_number: str) -> bytes:
        return self.cipher.encrypt(pack_template(embedding.vector, embedding.band), f"voice:{card_number}")

    def open_voice(self, ciphertext: bytes, card_number: str) -> SpeakerEmbedding:
        return unpack_template(self.cipher.decrypt(ciphertext, f"voice:{card_number}"))
