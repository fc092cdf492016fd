"""Instruction data: dataset formats and splits (`formats`), prompt formats (`prompts`) and `tokenization`."""

from __future__ import annotations

from .formats import COLUMNS, FILE_BUILDERS, FORMATS, QUICKSTART_DATA_DIR, SOURCE_COLUMNS, load_instruction_dataset
from .prompts import PROMPT_FORMATS, PROMPT_TEMPLATE, build_prompt, end_of_turn_token_id, format_prompt
from .tokenization import tokenize_for_generation, tokenize_for_training, training_collator

__all__ = [
    "COLUMNS",
    "FILE_BUILDERS",
    "FORMATS",
    "PROMPT_FORMATS",
    "PROMPT_TEMPLATE",
    "QUICKSTART_DATA_DIR",
    "SOURCE_COLUMNS",
    "build_prompt",
    "end_of_turn_token_id",
    "format_prompt",
    "load_instruction_dataset",
    "tokenize_for_generation",
    "tokenize_for_training",
    "training_collator",
]
