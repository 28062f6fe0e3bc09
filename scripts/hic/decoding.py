"""What every VLM backend is told and tells back: the decoding parameters of a call, all
explicit, and each generated text with the reason it ended. No model code here, so the
stages' row logic imports it without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Decoding:
    """Every decoding parameter, set explicitly and alike on both backends.

    Hugging Face's ``generate`` fills each parameter left unset from the checkpoint's
    ``generation_config`` (Qwen2.5-VL-Instruct's sets ``top_k: 1``, which turns sampling into
    greedy decoding, and ``repetition_penalty: 1.05``); vLLM's ``SamplingParams`` do not. So
    none is left unset: 0 turns top-k off, 1.0 turns top-p and the penalty off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_config(cls, d: dict) -> Decoding:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def effective(self) -> dict:
        """The values that act, as recorded in each row's provenance: greedy decoding takes
        the most likely token, so temperature, top-p and top-k do not act there."""
        if self.do_sample:
            return asdict(self)
        return {
            "do_sample": False,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 0,
            "repetition_penalty": self.repetition_penalty,
        }


GREEDY = Decoding()


class Generation(NamedTuple):
    """A generated text and why it ended: ``stop`` (the model's end token) or ``length``
    (cut off at the token limit, as vLLM names it)."""

    text: str
    finish_reason: str

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"
