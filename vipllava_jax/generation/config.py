"""`GenerationConfig`: every setting of one generation call but the model, the inputs and the mesh."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from .sampling import SamplingConfig
from .stop_strings import StopStrings


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationConfig:
    """Sampling, stop strings, buckets and the token ids of one generation: shared by `generate`,
    `generate_stream_tokens` and `generate_stream`. The fields are `generate`'s keyword arguments (same
    names, same defaults), so ``generate(module, params, ids, pixels, mask, **config.kwargs())`` is one call.

    max_new_tokens: new tokens per row. do_sample, temperature, top_k, top_p, repetition_penalty: HF's
    semantics (`SamplingConfig`). seed: the sampling seed, in [0, 2**31). eos_token_id / pad_token_id: default
    to the checkpoint's. stop_strings: the device tables (`stop_strings_for`). bucket: round the prompt length
    and max_new_tokens up to buckets, so new lengths rarely recompile."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    repetition_penalty: float = 1.0
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    stop_strings: StopStrings | None = None
    bucket: bool = True

    @property
    def sampling(self) -> SamplingConfig:
        """The static decoding settings (checked here: a bad temperature, top_k or top_p is a ValueError)."""
        return SamplingConfig(bool(self.do_sample), float(self.temperature), self.top_k, self.top_p,
                              float(self.repetition_penalty))

    def replace(self, **kw) -> "GenerationConfig":
        return dataclasses.replace(self, **kw)

    def kwargs(self) -> dict:
        """The fields as keyword arguments of `generate` (and the stream forms)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
