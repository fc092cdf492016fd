"""Prompt formats: the paper's Alpaca template and the tokenizer's chat template, and its end-of-turn token."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PROMPT_FORMATS", "PROMPT_TEMPLATE", "build_prompt", "end_of_turn_token_id", "format_prompt"]

# The Alpaca template (Taori et al., 2023), which FedKSeed uses for every dataset.
PROMPT_TEMPLATE = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
# How a row becomes a prompt: the paper's Alpaca template, or the tokenizer's own chat template (instruct models).
PROMPT_FORMATS = ("alpaca", "chat")


def build_prompt(instruction: str, input: str = "") -> str:
    """Fill the Alpaca template: the with-input variant when `input` has text, the no-input one otherwise.

    Args:
        instruction: the task description (an NI definition, a Dolly or Alpaca instruction).
        input: the instance's input or context; empty or whitespace-only selects the no-input variant.

    Returns:
        The prompt, ending with "### Response:\\n", after which the response is generated.

    Example:
        >>> build_prompt("Repeat the word.", "apple").endswith("### Input:\\napple\\n\\n### Response:\\n")
        True
    """
    if input.strip():
        return PROMPT_TEMPLATE["prompt_input"].format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE["prompt_no_input"].format(instruction=instruction)


def format_prompt(
    instruction: str, input: str = "", tokenizer: PreTrainedTokenizerBase | None = None, prompt_format: str = "alpaca"
) -> str:
    """The prompt text of one row, after which the model writes its response, in either prompt format.

    * `alpaca`: `build_prompt(instruction, input)`, the paper's template; `tokenizer` is not used.
    * `chat`: one user turn rendered by the tokenizer's chat template with the generation prompt, e.g. for ChatML
      "<|im_start|>user\\n{instruction}\\n\\n{input}<|im_end|>\\n<|im_start|>assistant\\n" (after the template's own
      default system turn, if it has one). The user message is the instruction, plus "\\n\\n" and the input when the
      input has text.

    Args:
        instruction: the task description.
        input: the instance's input or context; empty or whitespace-only leaves it out.
        tokenizer: the tokenizer whose `chat_template` renders the prompt; needed for `chat` only.
        prompt_format: one of `PROMPT_FORMATS`.

    Returns:
        The prompt text (for `chat`, with any special tokens the template writes, such as a BOS).

    Raises:
        ValueError: for an unknown `prompt_format`, or for `chat` without a tokenizer or without a chat template.

    Example:
        >>> format_prompt("Repeat the word.", "apple") == build_prompt("Repeat the word.", "apple")
        True
        >>> prompt = format_prompt("Repeat the word.", "apple", chatml_tokenizer, "chat")  # doctest: +SKIP
        >>> prompt.endswith("user\\nRepeat the word.\\n\\napple<|im_end|>\\n<|im_start|>assistant\\n")  # doctest: +SKIP
        True
    """
    _check_prompt_format(prompt_format)
    if prompt_format == "alpaca":
        return build_prompt(instruction, input)
    if tokenizer is None:
        raise ValueError("prompt_format='chat' renders the tokenizer's chat template: pass the `tokenizer`.")
    _check_chat_template(tokenizer)
    return _render_chat(tokenizer, [_user_turn(instruction, input)], add_generation_prompt=True)


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the tokenizer's chat template closes an assistant turn with, or None.

    Read from the template itself, not from a list of names: the first special token that the template writes after
    an assistant reply (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma). Generation
    must stop there, since an instruct model emits it, not necessarily its `eos_token`, when it has answered.

    Args:
        tokenizer: a `transformers` tokenizer.

    Returns:
        The token id, or None when the tokenizer has no chat template, the template fails to render a user turn and a
        reply, or it writes no special token after the reply.

    Example:
        >>> end_of_turn_token_id(AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"))  # doctest: +SKIP
        2
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    reply = "Done."
    try:
        _, completion = _chat_prompt_and_completion(tokenizer, "Say done.", "", reply)
    except Exception:  # any template that cannot render this probe has no end of turn we can read
        return None
    position = completion.find(reply)
    if position < 0:
        return None
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    special.update(
        int(token_id)
        for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        if getattr(token, "special", False)
    )
    tail = _encode(tokenizer, [completion[position + len(reply) :]])
    return next((token for token in (tail[0] if tail else []) if token in special), None)


def _check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"Unknown prompt_format={prompt_format!r}; pass one of: {', '.join(PROMPT_FORMATS)}.")


def _check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"prompt_format='chat' needs a chat template, and the tokenizer ({type(tokenizer).__name__}) has no chat "
            "template; use `prompt_format: alpaca`, or set `tokenizer.chat_template` to a Jinja template."
        )


def _user_turn(instruction: str, input: str) -> dict[str, str]:
    """The one user message of a row: the instruction, then a blank line and the input when the input has text."""
    return {"role": "user", "content": f"{instruction}\n\n{input}" if input.strip() else instruction}


def _render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_prompt_and_completion(
    tokenizer: PreTrainedTokenizerBase, instruction: str, input: str, output: str
) -> tuple[str, str]:
    """(prompt, completion) texts: the user turn with the generation prompt, and what the assistant reply adds to it."""
    user = _user_turn(instruction, input)
    prompt = _render_chat(tokenizer, [user], add_generation_prompt=True)
    full = _render_chat(tokenizer, [user, {"role": "assistant", "content": output}], add_generation_prompt=False)
    if not full.startswith(prompt):
        differ = next(
            (position for position, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b),
            min(len(prompt), len(full)),
        )
        raise ValueError(
            "The tokenizer's chat template renders the conversation with the assistant's reply so that it does not "
            "start with the prompt it renders with add_generation_prompt=True, so the prompt/reply boundary is "
            f"undefined (they differ at character {differ}: prompt {prompt[differ : differ + 40]!r}, with reply "
            f"{full[differ : differ + 40]!r}); use `prompt_format: alpaca`, or set `tokenizer.chat_template` to a "
            "template whose generation prompt is a prefix of the rendered reply."
        )
    return prompt, full[len(prompt) :]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
