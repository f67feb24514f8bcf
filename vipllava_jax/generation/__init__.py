"""Batched generation (prefill + an on-device decode loop), streaming, sharded generation, and text in / text
out (`generate_text`, `generate_text_stream`: processor, generate, decode, cut at the stop string), and
`pipeline` (chat messages in, answers out, as HF's image-text-to-text pipeline)."""
from .api import generate, generate_stream, generate_stream_tokens, sharded_generate
from .config import GenerationConfig
from .pipeline import ImageTextToTextPipeline, chat_prompt, chat_stop_strings, pipeline
from .inputs import bucket_length, check_count, check_seed, max_new_tokens_limit
from .sampling import (SamplingConfig, apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                       process_logits, select_tokens)
from .stop_strings import StopStrings, cut_at_stop, stop_strings_for, token_strings
from .text import generate_text, generate_text_stream

__all__ = ["generate", "generate_stream", "generate_stream_tokens", "sharded_generate", "GenerationConfig",
           "bucket_length", "check_count", "check_seed", "max_new_tokens_limit", "SamplingConfig",
           "apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_p", "process_logits",
           "select_tokens", "StopStrings", "cut_at_stop", "stop_strings_for", "token_strings", "generate_text",
           "generate_text_stream", "ImageTextToTextPipeline", "chat_prompt", "chat_stop_strings", "pipeline"]
